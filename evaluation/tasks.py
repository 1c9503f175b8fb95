"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A task file is .jsonl with {"context": str, "choices": [str, ...], "answer": int}. Each choice is scored as the
continuation " " + choice:
  loglik(choice) = sum over the continuation's tokens of log p(token | context, earlier continuation tokens)
acc picks argmax loglik; acc_norm picks argmax loglik / len(continuation in bytes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from artifacts.errors import UserError


@dataclass(frozen=True)
class Task:
    context: str
    choices: tuple[str, ...]
    answer: int                       # index into choices

    @property
    def continuations(self) -> tuple[str, ...]:
        """What is scored after the context: " " + choice."""
        return tuple(" " + c for c in self.choices)

    def to_dict(self) -> dict:
        return {"context": self.context, "choices": list(self.choices), "answer": self.answer}


@dataclass(frozen=True)
class EncodedTask:
    context: tuple[int, ...]                      # token ids of the context
    continuations: tuple[tuple[int, ...], ...]    # token ids of each continuation (each non-empty)


def encode(task: Task, tokenizer) -> EncodedTask:
    """Token ids as the harness splits them: the continuation is what tokenizing context + continuation adds after
    the context's own tokens (its own tokens where that adds none)."""
    ctx = tokenizer(task.context, add_special_tokens=False)["input_ids"]
    conts = []
    for c in task.continuations:
        ids = tokenizer(task.context + c, add_special_tokens=False)["input_ids"][len(ctx):] or \
            tokenizer(c, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"task choice {c.strip()!r} gives no tokens; drop it from the task file")
        conts.append(tuple(ids))
    if not ctx:
        raise UserError(f"task context {task.context!r} gives no tokens; give every task a context")
    return EncodedTask(tuple(ctx), tuple(conts))


def load_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist (or pass --tasks none to skip tasks)")
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
        tasks.append(Task(t["context"], tuple(t["choices"]), t["answer"]))
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise UserError(f"task file {path} has no tasks")
    return tasks


def _is_task(t) -> bool:
    if not isinstance(t, dict) or not isinstance(t.get("context"), str) or not t["context"].strip():
        return False
    choices, answer = t.get("choices"), t.get("answer")
    return (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
            and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices))


def score(tasks: list[Task], logliks: list[list[float]]) -> dict:
    """logliks[i][j]: loglik of task i's choice j. Returns acc, acc_norm and the number of tasks."""
    assert len(tasks) == len(logliks) > 0, "one list of logliks per task"
    correct = correct_norm = 0
    for t, ll in zip(tasks, logliks):
        norm = [v / max(len(c.encode()), 1) for v, c in zip(ll, t.continuations)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == t.answer)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == t.answer)
    return {"acc": correct / len(tasks), "acc_norm": correct_norm / len(tasks), "tasks": len(tasks)}
