"""Build the bundled cloze task file from held-out text: the last word of a sentence, against three distractors
drawn from other sentences' last words (seeded).

    python -m evaluation.make_tasks demo/data/dev.jsonl demo/data/tasks.jsonl --count 60
"""
from __future__ import annotations

import argparse
import json
import random
import re


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    items = []
    for line in open(args.data, encoding="utf-8"):
        text = json.loads(line)["text"]
        for sent in re.split(r"(?<=[.;:])\s+", text):
            m = re.fullmatch(r"(.{40,300}?)\s+([A-Za-z]{4,})[.;:]", sent.strip())
            if m:
                items.append((m.group(1), m.group(2)))
                break
    rng = random.Random(args.seed)
    words = sorted({w for _, w in items})
    rng.shuffle(items)
    with open(args.out, "w", encoding="utf-8") as f:
        for context, answer in items[: args.count]:
            distractors = rng.sample([w for w in words if w.lower() != answer.lower()], 3)
            choices = distractors + [answer]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "answer": choices.index(answer)}) + "\n")


if __name__ == "__main__":
    main()
