"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A task file is .jsonl with {"context": str, "choices": [str, ...], "answer": int}. For each choice,
  loglik(choice) = sum over the continuation's tokens of log p(token | context, earlier continuation tokens)
acc picks argmax loglik; acc_norm picks argmax loglik / len(choice in bytes).
"""
from __future__ import annotations

import json
from pathlib import Path

from artifacts.errors import UserError


def load_tasks(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"task file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    tasks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
        except json.JSONDecodeError:
            t = None
        if not _is_task(t):
            raise UserError(f"{path}:{n} is not a task: need {{\"context\": str, \"choices\": [str, str, ..], "
                            "\"answer\": index of the right choice}") from None
        tasks.append(t)
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise UserError(f"task file {path} has no tasks")
    return tasks


def _is_task(t) -> bool:
    if not isinstance(t, dict) or not isinstance(t.get("context"), str):
        return False
    choices, answer = t.get("choices"), t.get("answer")
    return (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
            and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices))


def score(tasks: list[dict], loglik) -> dict:
    """loglik(context, continuation) -> float. Returns acc and acc_norm."""
    correct = correct_norm = 0
    for t in tasks:
        ll = [loglik(t["context"], " " + c) for c in t["choices"]]
        norm = [v / max(len((" " + c).encode()), 1) for v, c in zip(ll, t["choices"])]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == int(t["answer"]))
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == int(t["answer"]))
    return {"acc": correct / len(tasks), "acc_norm": correct_norm / len(tasks), "tasks": len(tasks)}
