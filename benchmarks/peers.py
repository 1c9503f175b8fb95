"""Peers on the same model and prompts: HF `generate` with everything resident (the runtime's own overhead) and HF
transformers + accelerate disk offloading (device_map with max_memory and an offload_folder), next to the runtime.

Every figure is the median over prompts of the greedy time per token after the first:
    tpot = (t(generate n tokens) - t(generate 1 token)) / (n - 1)
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ("The function returns", "And the LORD said unto", "If the argument is omitted")
NEW_TOKENS = 24


def hf_generate_tpot(model: Path, offload_budget: float | None) -> dict:
    """HF generate in float32; with offload_budget (bytes), accelerate keeps that much in RAM and offloads the rest
    to disk. {"tpot_ms", "ok": True}, or {"ok": False, "error"} when the peer cannot run this model."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    kw = {"dtype": torch.float32}
    tmp = None
    if offload_budget is not None:
        tmp = tempfile.mkdtemp(prefix="offload-")
        kw.update(device_map="auto", max_memory={"cpu": int(offload_budget)}, offload_folder=tmp)
    pad = tok.pad_token_id or 0
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(model, **kw).eval()
        times = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=pad)      # warm-up
            t0 = time.perf_counter()
            out = m.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=pad)
            t1 = time.perf_counter()
            m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=pad)
            t2 = time.perf_counter()
            steps = out.shape[1] - ids.shape[1]
            times.append(((t1 - t0) - (t2 - t1)) / max(steps - 1, 1))               # s per token after the first
        return {"tpot_ms": 1e3 * float(np.median(times)), "ok": True}
    except Exception as exc:  # a peer that cannot run this model is reported, not fatal
        return {"ok": False, "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:240]}"}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def understudy_tpot(model: Path, **kw) -> dict:
    """The runtime's greedy TPOT on the same prompts (`Runtime.load(model, **kw)`, no emulated link), in float32
    as the HF peers run (the runtime's own default would be the checkpoint's bf16)."""
    from runtime import Runtime

    with Runtime.load(model, dtype="float32", **kw) as rt:
        times = []
        for p in PROMPTS:
            rt.stats.reset()
            rt.generate([p], max_new_tokens=NEW_TOKENS)
            times.append(rt.stats.tpot_s)
    return {"tpot_ms": 1e3 * float(np.median(times)), "ok": True}
