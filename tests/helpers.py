"""Small helpers shared by tests."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNDERSTUDY_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "tiny-qwen2moe"
UPCYCLED = SHARED / "fixtures" / "tiny-qwen2moe-upcycled"
DATA = SHARED / "fixtures" / "data"


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def sample_texts(n: int, length: int, seed: int = 0) -> list[str]:
    """n ASCII texts of exactly `length` characters (one byte-token each with the tiny byte tokenizer)."""
    import random

    rng = random.Random(seed)
    words = ["the", "expert", "cache", "token", "layer", "router", "score", "python", "lord", "said", "unto"]
    out = []
    for _ in range(n):
        s = ""
        while len(s) < length:
            s += rng.choice(words) + " "
        out.append(s[:length])
    return out
