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
    tasks = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
            assert isinstance(t["context"], str) and len(t["choices"]) >= 2 and 0 <= int(t["answer"]) < len(t["choices"])
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError, ValueError):
            raise UserError(f"{path}:{n} is not a task: need {{\"context\", \"choices\": [..], \"answer\": index}}") from None
        tasks.append(t)
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise UserError(f"task file {path} has no tasks")
    return tasks


def score(tasks: list[dict], loglik) -> dict:
    """loglik(context, continuation) -> float. Returns acc and acc_norm."""
    correct = correct_norm = 0
    for t in tasks:
        ll = [loglik(t["context"], " " + c) for c in t["choices"]]
        norm = [v / max(len((" " + c).encode()), 1) for v, c in zip(ll, t["choices"])]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == int(t["answer"]))
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == int(t["answer"]))
    return {"acc": correct / len(tasks), "acc_norm": correct_norm / len(tasks), "tasks": len(tasks)}
