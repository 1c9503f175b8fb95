"""Cloze tasks from held-out text: the last word of a sentence, against three distractors drawn from other
sentences' last words (seeded). moe-eval builds its default tasks with `cloze_tasks`; this module also writes them
to a task file:

    python -m evaluation.make_tasks demo/data/dev.jsonl tasks.jsonl --count 60
"""
from __future__ import annotations

import argparse
import json
import random
import re

from evaluation.tasks import Task

SENTENCE_END = re.compile(r"(?<=[.;:])\s+")
CLOZE = re.compile(r"(.{40,300}?)\s+([A-Za-z]{4,})[.;:]")   # context of 40..300 chars, then a word of 4+ letters
DISTRACTORS = 3


def cloze_tasks(texts: list[str], count: int, seed: int = 0) -> list[Task]:
    """Up to `count` tasks, at most one per text: its first sentence that matches CLOZE, asking for the sentence's
    last word among it and DISTRACTORS other texts' last words (none equal to it ignoring case). Tasks and choice
    order are shuffled with `seed`; texts with fewer than DISTRACTORS + 1 distinct last words give no tasks."""
    items: list[tuple[str, str]] = []             # (context, answer)
    for text in texts:
        for sent in SENTENCE_END.split(text):
            m = CLOZE.fullmatch(sent.strip())
            if m:
                items.append((m.group(1), m.group(2)))
                break
    rng = random.Random(seed)
    words = sorted({w for _, w in items})
    rng.shuffle(items)
    tasks = []
    for context, answer in items:
        if len(tasks) >= count:
            break
        others = [w for w in words if w.lower() != answer.lower()]
        if len(others) < DISTRACTORS:
            continue
        choices = rng.sample(others, DISTRACTORS) + [answer]
        rng.shuffle(choices)
        tasks.append(Task(context, tuple(choices), choices.index(answer)))
    return tasks


def main(argv: list[str] | None = None) -> None:
    from artifacts.texts import read_texts

    ap = argparse.ArgumentParser(description="write cloze tasks built from held-out text to a task file")
    ap.add_argument("data", help=".jsonl/.txt file or a datasets directory")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-field", default="text")
    args = ap.parse_args(argv)
    texts, _ = read_texts(args.data, args.text_field)
    with open(args.out, "w", encoding="utf-8") as f:
        for t in cloze_tasks(texts, args.count, args.seed):
            f.write(json.dumps(t.to_dict()) + "\n")


if __name__ == "__main__":
    main()
