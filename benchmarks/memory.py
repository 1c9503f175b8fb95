"""Benchmark: process memory while decoding, against what the expert-cache budget promises.

    python benchmarks/memory.py [--models DIR,...] [--out docs/BENCHMARKS.md | -]

Every measurement runs in a fresh child process (this script with a hidden `--child`), so no run's memory leaks
into the next. The baseline child imports torch, transformers, psutil and `runtime.Runtime` and reads its anonymous
RSS: the floor that Python and its libraries cost before any model. It also imports the model's transformers
modeling module (the one `AutoModelForCausalLM` resolves the config to, which transformers imports lazily and which
costs tens of MiB by itself): library code, not the run's memory. Each case child then loads a model with
`Runtime.load(model, policy=..., cache=..., link=None)` and greedily decodes MAX_NEW_TOKENS tokens for a batch of
dev prompts while a sampler thread reads /proc/self/status (RssAnon, RssFile) and psutil's RSS every 5 ms.

Anonymous memory (RssAnon) is the run's own: heap, tensors, the expert cache. RssFile counts pages of mmap'd files
(the checkpoint, shared libraries): page cache, shared with other processes and reclaimable, so it is reported
apart and not held against the budget. The budget is kept when

    peak RssAnon while decoding  <=  allowance = baseline + dense + cache + SLACK

    dense = bytes of the model's module parameters (our MoE blocks hold no routed experts: this is the dense part)
    cache = rt.stats.cache_capacity_bytes (slots x expert bytes in the dtype the cache holds; resident: all experts)
    SLACK = 64 MiB for activations, the KV cache (its size, computed from the config, is shown), the float32
            workspace an expert is widened into, allocator slack and the tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
DEV = SHARED / "data" / "dev.jsonl"
PROMPTS, PROMPT_CHARS, MAX_NEW_TOKENS = 4, 60, 32
SLACK_MIB = 64
PERIOD_S = 0.005
MIB = 2**20
# (policy, cache, compute dtype); None dtype: the checkpoint's (bf16 here)
CASES = [("lru", "12.5%", None), ("lru", "25%", None), ("lru", "50%", None), ("smoe", "12.5%", None),
         ("smoe", "25%", None), ("smoe", "50%", None), ("resident", None, None), ("lru", "25%", "float32")]
HEADING = "## Memory: the budget held in process memory"


# ---- child side ------------------------------------------------------------------------------------------------
def read_memory(proc: "psutil.Process") -> dict[str, int]:
    """Bytes now: rss (psutil), anon and file (/proc/self/status; where there is none, psutil's uss and 0)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        anon, file = (int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    except (OSError, KeyError):
        anon, file = proc.memory_full_info().uss, 0
    return {"rss": proc.memory_info().rss, "anon": anon, "file": file}


class Sampler(threading.Thread):
    """Reads memory every PERIOD_S and keeps the peak of each field per phase (set `phase` to switch)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc, self.phase, self.peaks, self.stop = psutil.Process(), "load", {}, threading.Event()

    def sample(self) -> None:
        peak = self.peaks.setdefault(self.phase, {})
        for k, v in read_memory(self.proc).items():
            peak[k] = max(peak.get(k, 0), v)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(PERIOD_S)


def child(case: dict) -> dict:
    """Baseline (policy None): memory after the imports. Otherwise: load, decode, and the peaks while doing so."""
    import psutil
    import torch
    import transformers  # noqa: F401
    from runtime import Runtime

    torch.set_num_threads(1)   # one core computes, the other runs the loader thread
    if case["policy"] is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from runtime.model_loader import load_config

        core = read_memory(psutil.Process())["anon"]
        MODEL_FOR_CAUSAL_LM_MAPPING[type(load_config(case["model"]))]   # imports the architecture's module
        return {**read_memory(psutil.Process()), "core_anon": core}
    prompts = [json.loads(line)["text"][:PROMPT_CHARS] for line in DEV.read_text().splitlines()[:PROMPTS]]
    sampler = Sampler()
    sampler.start()
    with Runtime.load(case["model"], policy=case["policy"], cache=case["cache"], link=None,
                      dtype=case["dtype"]) as rt:
        sampler.sample()
        sampler.phase = "decode"
        ids, mask = rt.encode(prompts)
        tokens = rt.generate_ids(ids, mask, max_new_tokens=MAX_NEW_TOKENS)
        sampler.sample()
        sampler.stop.set()
        sampler.join()
        cfg, lm = rt.lm.config, rt.lm
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        positions = ids.shape[1] + tokens.shape[1] - 1   # the last token is never fed
        kv = (2 * cfg.num_hidden_layers * len(prompts) * cfg.num_key_value_heads * head_dim * positions
              * lm.dtype.itemsize)
        return {"dense": sum(p.numel() * p.element_size() for p in lm.model.parameters()),
                "cache_bytes": rt.stats.cache_capacity_bytes, "kv": kv, "compute_dtype": str(lm.dtype)[6:],
                "cache_dtype": rt.budget.expert_dtype if rt.budget else str(lm.dtype)[6:],
                "budget": rt.budget.describe() if rt.budget else "resident: every routed expert held",
                "peaks": sampler.peaks}


def spawn(case: dict) -> dict:
    """Run one child (this script, --child) and return the JSON it prints last."""
    arg = json.dumps(case)
    p = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"child {arg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- parent side -----------------------------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def section(bases: dict[str, dict], rows: list[dict]) -> str:
    """The markdown between the markers: how it was made, the table, and what the numbers say."""
    import torch

    slack = SLACK_MIB * MIB
    lines = [f"Made by `{shlex.join(['python', 'benchmarks/memory.py'] + sys.argv[1:])}` on {platform.platform()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, one compute thread. Each row is a fresh process that "
             f"loads the model with `Runtime.load(..., link=None)` and greedily decodes {MAX_NEW_TOKENS} tokens for "
             f"{PROMPTS} dev prompts (their first {PROMPT_CHARS} characters) as one batch; memory is sampled every "
             f"{PERIOD_S * 1e3:.0f} ms from /proc/self/status (RssAnon, RssFile) and psutil (RSS).", ""]
    for model, b in bases.items():
        lines.append(f"- Baseline for {Path(model).name}: {mib(b['core_anon'])} MiB anonymous after importing torch, "
                     f"transformers, psutil and the runtime, {mib(b['anon'])} MiB once transformers' modeling module "
                     f"for the architecture is imported too (the floor used below); {mib(b['file'])} MiB file-backed.")
    lines += ["", f"allowance = baseline + dense + cache + {SLACK_MIB} MiB slack (activations, KV cache, the float32 "
              "workspace, allocator slack, tokenizer); the outcome compares the peak anonymous RSS while decoding "
              "with it. MiB throughout; `cache` is `rt.stats.cache_capacity_bytes` (resident: every routed expert); "
              "KV is the decode's KV cache computed from the config.", "",
              "| model | policy | cache | compute / cache dtype | baseline | dense | cache | KV | allowance | "
              "peak anon, load | peak anon, decode | peak RSS, decode | peak RssFile | outcome |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    within = 0
    for r in rows:
        base = bases[r["model"]]["anon"]
        allowance = base + r["dense"] + r["cache_bytes"] + slack
        load, dec = r["peaks"]["load"], r["peaks"]["decode"]
        over = dec["anon"] - allowance
        within += over <= 0
        lines.append(f"| {Path(r['model']).name} | {r['policy']} | {r['cache'] or 'all'} | {r['compute_dtype']} / "
                     f"{r['cache_dtype']} | {mib(base)} | {mib(r['dense'])} | {mib(r['cache_bytes'])} | "
                     f"{r['kv'] / MIB:.2f} | {mib(allowance)} | {mib(load['anon'])} | {mib(dec['anon'])} | "
                     f"{mib(dec['rss'])} | {mib(max(load['file'], dec['file']))} | "
                     f"{'within' if over <= 0 else f'over by {mib(over)} MiB'} |")
    kv_max = max(r["kv"] for r in rows)
    lines += ["", f"{within} of {len(rows)} cases stayed within the allowance"
              + ("." if within == len(rows) else f"; {len(rows) - within} went over (see the outcome column).")
              + f" The largest KV cache, {kv_max / MIB:.2f} MiB, is {100 * kv_max / slack:.1f}% of the slack.", ""]
    for model in bases:
        for policy in ("lru", "smoe"):
            same = sorted((r for r in rows if (r["model"], r["policy"], r["dtype"]) == (model, policy, None)),
                          key=lambda r: r["cache_bytes"])
            if len(same) > 1:
                lo, hi = same[0], same[-1]
                rise = hi["peaks"]["decode"]["anon"] - lo["peaks"]["decode"]["anon"]
                lines.append(f"- {Path(model).name}, {policy}: from cache {lo['cache']} to {hi['cache']} the capacity "
                             f"grows by {mib(hi['cache_bytes'] - lo['cache_bytes'])} MiB and the peak anonymous RSS "
                             f"while decoding by {mib(rise)} MiB.")
    lines.append("")
    for model, b in bases.items():
        files = [max(r["peaks"]["load"]["file"], r["peaks"]["decode"]["file"]) for r in rows if r["model"] == model]
        ckpt = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
        lines.append(f"RssFile ({Path(model).name}) peaked between {mib(min(files))} and {mib(max(files))} MiB, "
                     f"against the baseline's {mib(b['file'])} MiB of mapped libraries; the rise (at most "
                     f"{mib(max(files) - b['file'])} MiB, for a checkpoint of {mib(ckpt)} MiB) is the page cache of "
                     "the mmap'd checkpoint and of libraries loaded with the model: shared, reclaimable by the "
                     "kernel, and not the run's own memory, so it is left out of the allowance.")
    for r in rows:
        if r["dtype"] == "float32":
            lines += ["", f"float32 run ({Path(r['model']).name}): `{r['budget']}`; the cache holds "
                      f"{r['cache_dtype']} experts ({mib(r['cache_bytes'])} MiB), the dense part is "
                      f"{mib(r['dense'])} MiB in {r['compute_dtype']}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(SHARED / "tiny-qwen2moe"), help="comma-separated checkpoint dirs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="markdown file, or - for stdout")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    bases, rows = {}, []
    for model in args.models.split(","):
        bases[model] = spawn({"model": model, "policy": None})
        print(f"{Path(model).name} baseline: anon {mib(bases[model]['anon'])} MiB", file=sys.stderr, flush=True)
        for policy, cache, dtype in CASES:
            case = {"model": model, "policy": policy, "cache": cache, "dtype": dtype}
            rows.append({**case, **spawn(case)})
            print(f"{Path(model).name} {policy} {cache or ''} {dtype or ''}: peak anon while decoding "
                  f"{mib(rows[-1]['peaks']['decode']['anon'])} MiB", file=sys.stderr, flush=True)
    text = section(bases, rows)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sections import write_section

    write_section(args.out, "memory", HEADING, text)
    if args.out != "-":
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
