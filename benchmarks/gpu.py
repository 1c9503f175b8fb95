"""Benchmark on a CUDA device: TPOT, loads and achieved copy bandwidth of resident / lru / plan on a random-weight
model with Qwen3-30B-A3B's MoE shapes, experts in pinned host memory, and the CUDA exactness test.

    python benchmarks/gpu.py                  # markdown on stdout; sized for < 8 min on an H100/H200 (prints its time)
    python benchmarks/gpu.py --write          # and the section "gpu" of docs/BENCHMARKS.md
    python benchmarks/gpu.py --dry-run-cpu    # the same pipeline on the CPU with a tiny model (not with --write)

Model (built once into out/benchmarks/gpu-models, keyed by its config's hash): a bf16 qwen3_moe checkpoint with
hidden 2048, 128 routed experts of intermediate 768, top-8 with renormalised weights, 32 heads / 4 KV heads of 128,
`--layers` decoder layers (the real model has 48) and the fixture tokenizer's 4096-token vocabulary, its experts one
tensor each as real Qwen3 checkpoints store them. Weights normal with std 0.02, routers std H^-1/2 (router logits
of unit scale), embeddings std 1, and the LM head the embedding with its rows permuted (row perm[t] = embedding
t): greedy decoding then walks a cycle of that permutation, a new token each step, so routing changes every step as
in text.

Per policy (resident; lru and plan at each --caches budget): `Runtime.load(model, policy, cache, device="cuda",
store="host")` (experts in pinned host memory, copied into cache slots on the loader's CUDA stream), a warm-up
decode, then `repeats` greedy decodes of `tokens` tokens (ignore_eos) after a random `prompt`-token prompt; the
figures are those of the decode with the median TPOT:
    TPOT            = (stamp of token n - stamp of token 1) / (n - 1), torch.cuda.synchronize() before each stamp
    loads / token   = expert copies during decode steps / decode positions (RunStats, prefill apart)
    copy bandwidth  = bytes the loader copied / sum of those copies' durations; the runtime times no copy on CUDA
                      (a Ticket's t_start..t_end spans only the issue of a non-blocking copy), so the loader's store
                      is wrapped (`CopyTimer`) and each copy is bracketed by CUDA events on the loader's stream
    copy busy       = sum of copy durations / decode time (copies issued within the timed steps)
    peak memory     = torch.cuda.max_memory_allocated over the runtime's load and decodes
`plan`: profile of `calib_samples` windows of calibration text (the fixture's calib.jsonl and tokenizer), compiled at
the same budget for a target measured here (`measure_rates`: pinned copies on a side stream, a batch-1 expert GEMV
on the device and on the host). Last, `python -m pytest -q -m gpu tests/runtime/test_gpu.py` as a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNDERSTUDY_SHARED", ROOT.parent / "shared"))
MODELS_DIR = ROOT / "out" / "benchmarks" / "gpu-models"
INIT = "v1: std 0.02, routers H^-1/2, embeddings 1, head = permuted embedding"   # part of the model's key
GiB, MiB = 2**30, 2**20


@dataclass(frozen=True)
class Shape:
    """The model's dimensions (Qwen3-30B-A3B's, with fewer decoder layers)."""

    layers: int = 4
    hidden: int = 2048
    expert_intermediate: int = 768
    experts: int = 128
    top_k: int = 8
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128


@dataclass(frozen=True)
class GpuBenchConfig:
    shape: Shape = Shape()
    device: str = "cuda"
    caches: tuple[str, ...] = ("25%", "50%")
    policies: tuple[str, ...] = ("resident", "lru", "plan")     # resident first: the reference
    tokens: int = 64             # new tokens per timed decode
    prompt: int = 16             # random prompt tokens
    warmup: int = 8              # new tokens of the untimed warm-up decode
    repeats: int = 3
    calib_samples: int = 16      # profile: calibration windows ...
    seq_len: int = 128           # ... of this many tokens
    probe_tokens: int = 512
    sensitivity_tokens: int = 256
    search_tokens: int = 256     # compile: trace tokens per search candidate (and for the slot curves)
    predict_tokens: int = 1024
    timing_repeats: int = 20     # rate measurements
    bulk_bytes: int = 256 * MiB
    seed: int = 0


DRY_RUN = GpuBenchConfig(shape=Shape(layers=2, hidden=64, expert_intermediate=32, heads=4, kv_heads=1, head_dim=16),
                         device="cpu", tokens=4, prompt=8, warmup=2, repeats=1, calib_samples=4, seq_len=64,
                         probe_tokens=128, sensitivity_tokens=64, search_tokens=128, predict_tokens=256,
                         timing_repeats=3, bulk_bytes=16 * MiB)


# ---- model -----------------------------------------------------------------------------------------------------
def hf_config(shape: Shape, vocab: int, eos: int):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=3 * shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, moe_intermediate_size=shape.expert_intermediate, num_experts=shape.experts,
        num_experts_per_tok=shape.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=False)


def build_model(shape: Shape, tokenizer_dir: Path, device: torch.device, seed: int = 0,
                root: Path = MODELS_DIR) -> Path:
    """The checkpoint under `root`, built on first use (safetensors written directly, one shard per layer's
    experts; weights drawn on `device`) and reused after."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = hf_config(shape, len(tok), tok.eos_token_id)
    key = json.dumps([config.to_dict(), INIT, seed], sort_keys=True, default=str)
    out = root / f"qwen3-30b-a3b-shapes-{shape.layers}l-h{shape.hidden}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    h, i = shape.hidden, shape.expert_intermediate
    dense: dict[str, torch.Tensor] = {}
    for name, p in skeleton.state_dict().items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("norm.weight"):
            dense[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        elif name.endswith("mlp.gate.weight"):
            dense[name] = normal(*p.shape, std=h ** -0.5)
        elif name != "lm_head.weight":
            dense[name] = normal(*p.shape, std=1.0 if "embed_tokens" in name else 0.02)
    perm = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))
    dense["lm_head.weight"] = dense["model.embed_tokens.weight"][torch.argsort(perm)].contiguous()   # [V, H]
    weight_map, total = {}, 0

    def write(n: int, tensors: dict[str, torch.Tensor]) -> None:   # one shard at a time: host memory stays small
        nonlocal total
        fname = f"model-{n + 1:05d}-of-{shape.layers + 1:05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(0, dense)
    for l in range(shape.layers):   # routed experts one tensor each: gate/up [I, H], down [H, I]
        prefix = f"model.layers.{l}.mlp.experts."
        write(l + 1, {prefix + f"{e}.{n}.weight": normal(*s, std=0.02) for e in range(shape.experts)
                      for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, tmp / f)
    os.replace(tmp, out)
    return out


# ---- machine rates and the plans -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    """This machine's rates, measured on one expert of the model (bytes per second; seconds)."""

    expert_bytes: int
    expert_copy: float       # one expert, pinned host -> device on a side stream
    bulk_copy: float         # `bulk_bytes`, likewise
    small_copy_s: float      # one 4 KiB copy: the link latency
    device_expert: float     # expert bytes / time of a batch-1 expert GEMV on the device
    host_expert: float       # the same on the host (the runtime's host compute)
    device_memory: int


def seconds_per_call(fn, repeats: int, device: torch.device) -> float:
    """Mean seconds of fn() after two warm-up calls: CUDA events on the current stream, else perf_counter."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure_rates(model_dir: Path, device: torch.device, repeats: int, bulk_bytes: int) -> Rates:
    from runtime.expert_compute import make_expert_fn
    from runtime.expert_store import ExpertStore
    from runtime.model_loader import load_config
    from runtime.checkpoint import Checkpoint
    from runtime.families import resolve_arch

    arch = resolve_arch(load_config(model_dir))
    cuda = device.type == "cuda"
    host = {k: v.pin_memory() if cuda else v
            for k, v in ExpertStore(Checkpoint(model_dir), arch).read(arch.moe_layers[0], 0).items()}
    nbytes = sum(t.numel() * t.element_size() for t in host.values())
    on_dev = {k: torch.empty_like(v, device=device) for k, v in host.items()}
    bulk = torch.empty(bulk_bytes, dtype=torch.uint8, pin_memory=cuda)
    small = bulk[:4096]
    bulk_dst, small_dst = torch.empty_like(bulk, device=device), torch.empty_like(small, device=device)

    def copy_expert():
        for k, t in on_dev.items():
            t.copy_(host[k], non_blocking=True)

    side = torch.cuda.Stream(device) if cuda else None
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
        expert_s = seconds_per_call(copy_expert, repeats, device)
        bulk_s = seconds_per_call(lambda: bulk_dst.copy_(bulk, non_blocking=True), max(2, repeats // 4), device)
        small_s = seconds_per_call(lambda: small_dst.copy_(small, non_blocking=True), repeats, device)
    f = make_expert_fn(arch.experts)
    x = torch.randn(1, arch.experts.hidden, dtype=torch.bfloat16)                 # [1, H]
    x_dev = x.to(device)
    device_s = seconds_per_call(lambda: f(x_dev, on_dev), repeats, device)
    host_s = seconds_per_call(lambda: f(x, host), repeats, torch.device("cpu"))
    memory = (torch.cuda.get_device_properties(device).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Rates(nbytes, nbytes / expert_s, bulk_bytes / bulk_s, small_s, nbytes / device_s, nbytes / host_s, memory)


def write_target(rates: Rates, device: torch.device, name: str, path: Path) -> Path:
    """A compiler target (compiler/targets.py fields) from the measured rates."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": f"measured-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}",
        "description": f"measured by benchmarks/gpu.py on {name}", "device_memory": rates.device_memory,
        "device_mem_bandwidth": rates.device_expert, "link_bandwidth": rates.bulk_copy,
        "link_latency": rates.small_copy_s, "host_mem_bandwidth": rates.host_expert,
        "workspace": GiB if device.type == "cuda" else 256 * MiB, "device_kind": device.type}, sort_keys=False))
    return path


def make_plans(model_dir: Path, cfg: GpuBenchConfig, calib: Path, target: Path, log) -> dict[str, object]:
    """A plan per budget in cfg.caches, from one profile (cached beside the model, keyed by its settings)."""
    from artifacts.profile import Profile
    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile

    pcfg = ProfileConfig(samples=cfg.calib_samples, seq_len=cfg.seq_len, seed=cfg.seed, device=cfg.device,
                         probe_tokens=cfg.probe_tokens, sensitivity_tokens=cfg.sensitivity_tokens, quant_tokens=0)
    key = hashlib.sha256(json.dumps([asdict(pcfg), str(calib)], sort_keys=True).encode()).hexdigest()[:12]
    where = model_dir.with_name(model_dir.name + "-work") / f"profile-{key}"
    if not where.is_dir():                    # Profile.save writes the directory atomically
        profile(model_dir, str(calib), pcfg, progress=False).save(where)
    Profile.load(where, with_trace=False)     # a cached profile is checked before use
    quiet = lambda msg: log(f"  moe-compile: {msg}")   # noqa: E731
    return {c: compile_plan(where, CompileConfig(budget=c, target=str(target), search_tokens=cfg.search_tokens,
                                                 predict_tokens=cfg.predict_tokens), log=quiet) for c in cfg.caches}


# ---- one policy ------------------------------------------------------------------------------------------------
class CopyTimer:
    """The loader's expert store, every `copy_into` timed: on CUDA by events recorded on the current stream (the
    loader's, inside its `torch.cuda.stream` block) before and after the copies are issued, so their interval is the
    copy on that stream; on the CPU by perf_counter (the copy is synchronous). Everything else goes to the store."""

    def __init__(self, store, device: torch.device):
        self.store, self.cuda = store, device.type == "cuda"
        self.copies: list[tuple] = []     # (issued at, bytes, start event | seconds, end event | None)

    def copy_into(self, layer: int, e: int, dst, non_blocking: bool = False) -> int:
        t = time.perf_counter()
        if not self.cuda:
            n = self.store.copy_into(layer, e, dst, non_blocking=non_blocking)
            self.copies.append((t, n, time.perf_counter() - t, None))
            return n
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        n = self.store.copy_into(layer, e, dst, non_blocking=non_blocking)
        end.record()
        self.copies.append((t, n, start, end))
        return n

    def __getattr__(self, name):
        return getattr(self.store, name)

    def within(self, lo: float, hi: float) -> tuple[int, float]:
        """(bytes, seconds) of the copies issued in [lo, hi]; waits for each to land."""
        nbytes, secs = 0, 0.0
        for t, b, start, end in list(self.copies):
            if lo <= t <= hi:
                if end is not None:
                    end.synchronize()
                nbytes += b
                secs += start if end is None else start.elapsed_time(end) / 1e3
        return nbytes, secs


@dataclass(frozen=True)
class Decode:
    tpot_ms: float
    loads_per_token: float
    hit_rate: float
    host_rate: float
    substituted_rate: float      # understudies + drops, of routed pairs
    copy_bytes: int
    copy_s: float
    decode_s: float
    distinct: int                # distinct tokens decoded

    @property
    def copy_bandwidth(self) -> float | None:
        return self.copy_bytes / self.copy_s if self.copy_s > 0 else None


@dataclass(frozen=True)
class Cell:
    policy: str
    cache: str | None
    m: Decode                     # the decode with the median TPOT
    tpots: tuple[float, ...]      # every timed decode's
    load_s: float
    peak_bytes: int               # max_memory_allocated (CUDA), else 0
    cache_bytes: int              # the expert cache's capacity
    plan: dict | None = None      # the plan's budget, choices and predictions


def timed_decode(rt, timer: CopyTimer | None, ids: torch.Tensor, tokens: int, sync) -> Decode:
    rt.stats.reset()
    if timer is not None:
        timer.copies = []
    stamps: list[float] = []

    def on_step(_):
        sync()
        stamps.append(time.perf_counter())

    sync()
    out = rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=tokens, ignore_eos=True, on_step=on_step)
    sync()
    assert out.shape[1] == tokens == len(stamps), f"decoded {out.shape[1]} of {tokens} tokens"
    lo, hi = stamps[0], stamps[-1]
    nbytes, secs = timer.within(lo, hi) if timer is not None else (0, 0.0)
    d = rt.stats.to_dict()
    return Decode(tpot_ms=1e3 * (hi - lo) / (tokens - 1), loads_per_token=d["loads_per_token"],
                  hit_rate=d["hit_rate"], host_rate=d["host_rate"], substituted_rate=d["substitution_rate"] +
                  d["drop_rate"], copy_bytes=nbytes, copy_s=secs, decode_s=hi - lo,
                  distinct=len(set(out[0].tolist())))


def run_policy(model_dir: Path, cfg: GpuBenchConfig, policy: str, cache: str | None, plan, log) -> Cell:
    from runtime import Runtime

    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kw = {"plan": plan} if policy == "plan" else {"cache": cache}
    with Runtime.load(model_dir, policy=policy, device=cfg.device, store="host", **kw) as rt:
        load_s = time.perf_counter() - t0
        timer = None
        if rt.loader is not None:   # wrap the loader's store (a public attribute of our own object)
            timer = rt.loader.store = CopyTimer(rt.loader.store, device)
        gen = torch.Generator().manual_seed(cfg.seed)
        prompts = [torch.randint(1, rt.lm.config.vocab_size, (1, cfg.prompt), generator=gen).to(device)
                   for _ in range(cfg.repeats + 1)]
        rt.generate_ids(prompts[0], max_new_tokens=cfg.warmup, ignore_eos=True)
        runs = [timed_decode(rt, timer, p, cfg.tokens, sync) for p in prompts[1:]]
        cache_bytes = rt.stats.cache_capacity_bytes
    ranked = sorted(runs, key=lambda m: m.tpot_ms)
    info = None
    if plan is not None:
        c, pred = plan.choices, plan.predicted
        info = {"budget_bytes": plan.cache_budget_bytes, "alpha": c.alpha,
                "prefetch": c.prefetch, "host_compute": c.host_compute, "drops": c.drop_misses,
                "pred_plan_ms": pred["plan"]["tpot_ms"], "pred_lru_ms": pred["lru"]["tpot_ms"]}
    cell = Cell(policy, cache, ranked[(len(ranked) - 1) // 2], tuple(m.tpot_ms for m in runs), load_s,
                torch.cuda.max_memory_allocated(device) if cuda else 0, cache_bytes, info)
    log(f"{policy}{' ' + cache if cache else ''}: loaded in {load_s:.1f} s; TPOT {cell.m.tpot_ms:.2f} ms, "
        f"{cell.m.loads_per_token:.1f} loads/token, hit rate {cell.m.hit_rate:.1%}")
    return cell


def exactness_test() -> tuple[str, str]:
    """(outcome, pytest's summary line) of the CUDA exactness test, run as a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/runtime/test_gpu.py"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timed out", "over 600 s"
    lines = [s.strip() for s in r.stdout.splitlines() if s.strip()]
    summary = lines[-1].strip("= ") if lines else (r.stderr.strip().splitlines() or ["no output"])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    if counts.get("failed") or counts.get("error") or counts.get("errors"):
        outcome = "failed"
    elif counts.get("passed") and r.returncode == 0:
        outcome = "passed"
    elif counts.get("skipped"):
        reason = next((s for s in lines if s.startswith("SKIPPED")), "")
        outcome = "skipped" + (f" ({reason.rpartition(': ')[2]})" if reason else "")
    else:
        outcome = f"exit code {r.returncode}"
    return outcome, summary


# ---- report ----------------------------------------------------------------------------------------------------
def gbps(x: float | None) -> str:
    return "" if x is None else f"{x / 1e9:.1f}"


def table(cells: list[Cell], cuda: bool) -> list[str]:
    ref = next((c.m.tpot_ms for c in cells if c.policy == "resident"), None)
    lru = {c.cache: c.m.tpot_ms for c in cells if c.policy == "lru"}
    out = ["| policy | cache | TPOT ms | TPOT range | x resident | x lru | loads / token | hit rate | host / pair | "
           "substituted | copy GB/s | copy busy | load s | cache GiB | peak " + ("GPU " if cuda else "") + "GiB |",
           "|---" * 15 + "|"]
    for c in cells:
        m = c.m
        xr = "" if ref is None or c.policy == "resident" else f"{m.tpot_ms / ref:.2f}"
        xl = f"{m.tpot_ms / lru[c.cache]:.2f}" if c.policy == "plan" and c.cache in lru else ""
        busy = f"{m.copy_s / m.decode_s:.0%}" if m.decode_s > 0 and c.policy != "resident" else ""
        out.append(f"| {c.policy} | {c.cache or 'all'} | {m.tpot_ms:.2f} | {min(c.tpots):.2f}-{max(c.tpots):.2f} | "
                   f"{xr} | {xl} | {m.loads_per_token:.2f} | {m.hit_rate:.1%} | {m.host_rate:.1%} | "
                   f"{m.substituted_rate:.1%} | {gbps(m.copy_bandwidth)} | {busy} | {c.load_s:.1f} | "
                   f"{c.cache_bytes / GiB:.2f} | " + (f"{c.peak_bytes / GiB:.2f} |" if cuda else "n/a |"))
    return out


def findings(cells: list[Cell], rates: Rates, shape: Shape, tokens: int, test: tuple[str, str],
             cuda: bool) -> list[str]:
    """Sentences computed from the cells."""
    out = []
    ref = next((c for c in cells if c.policy == "resident"), None)
    by = {(c.policy, c.cache): c for c in cells}
    for cache in dict.fromkeys(c.cache for c in cells if c.cache):
        parts = []
        for p in ("lru", "plan"):
            c = by.get((p, cache))
            if c is not None:
                parts.append(f"{p} {c.m.tpot_ms:.2f} ms" + (f" ({c.m.tpot_ms / ref.m.tpot_ms:.2f}x resident's "
                                                             f"{ref.m.tpot_ms:.2f} ms)" if ref else ""))
        lru, plan = by.get(("lru", cache)), by.get(("plan", cache))
        line = f"- At {cache} cache: " + ", ".join(parts)
        if lru and plan:
            line += (f"; plan/lru TPOT {plan.m.tpot_ms / lru.m.tpot_ms:.2f}, loads per token "
                     f"{plan.m.loads_per_token:.2f} against {lru.m.loads_per_token:.2f}. The compiler predicted "
                     f"{plan.plan['pred_plan_ms']:.2f} ms for plan and {plan.plan['pred_lru_ms']:.2f} ms for lru on "
                     "the measured target")
        out.append(line + ".")
        if lru:
            chance = lru.cache_bytes / rates.expert_bytes / (shape.experts * shape.layers)
            out.append(f"- lru's hit rate at {cache} is {lru.m.hit_rate:.1%}; independent uniform routing would give "
                       f"the cached share, {chance:.1%}.")
    off = [c for c in cells if c.m.copy_bandwidth]
    if off:
        lo, hi = min(off, key=lambda c: c.m.copy_bandwidth), max(off, key=lambda c: c.m.copy_bandwidth)
        busiest = max(off, key=lambda c: c.m.copy_s / c.m.decode_s)
        out.append(f"- The loader's copies achieved {gbps(lo.m.copy_bandwidth)}-{gbps(hi.m.copy_bandwidth)} GB/s "
                   f"({lo.m.copy_bandwidth / rates.bulk_copy:.0%}-{hi.m.copy_bandwidth / rates.bulk_copy:.0%} of a "
                   f"{gbps(rates.bulk_copy)} GB/s bulk copy; one expert copied alone: "
                   f"{gbps(rates.expert_copy)} GB/s); the copy stream was busy at most "
                   f"{busiest.m.copy_s / busiest.m.decode_s:.0%} of the decode ({busiest.policy} {busiest.cache}).")
    plans = [c for c in cells if c.plan]
    if cuda and plans:
        out.append("- Peak GPU memory against the plan's cache budget: " + "; ".join(
            f"{c.cache}: {c.peak_bytes / GiB:.2f} GiB in all, cache {c.cache_bytes / GiB:.2f} GiB of a "
            f"{c.plan['budget_bytes'] / GiB:.2f} GiB budget" for c in plans)
            + (f" (resident: {ref.peak_bytes / GiB:.2f} GiB)" if ref else "") + ".")
    lo, hi = min(c.m.distinct for c in cells), max(c.m.distinct for c in cells)
    out.append(f"- The greedy decodes of {tokens} tokens held {lo if lo == hi else f'{lo}-{hi}'} distinct tokens "
               "each.")
    out.append(f"- CUDA exactness test (`pytest -m gpu tests/runtime/test_gpu.py`): {test[0]} ({test[1]}).")
    return out


def section(cells: list[Cell], cfg: GpuBenchConfig, rates: Rates, test: tuple[str, str], info: dict) -> str:
    from artifacts.units import human_bytes

    s, cuda = cfg.shape, cfg.device.startswith("cuda")
    plan = next((c.plan for c in cells if c.plan), None)
    onoff = lambda b: "on" if b else "off"   # noqa: E731
    held = ("Experts in pinned host memory (`store=\"host\"`), copied into cache slots on the loader's CUDA stream"
            if cuda else "On the CPU: experts in host memory (`store=\"host\"`), copied by the loader thread")
    timing = ("CUDA events on the loader's stream around each expert's copy; the runtime itself times only the issue "
              "of its non-blocking copies" if cuda else "perf_counter around each synchronous copy")
    lines = [f"Made by `{info['command']}` at commit {info['commit'] or 'unknown'} on {info['machine']}; "
             f"{info['device_name']}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, {info['date']}; "
             f"the run took {info['run_s']:.0f} s (model {info['build_s']:.0f} s, rates and plans "
             f"{info['plans_s']:.0f} s, exactness test {info['test_s']:.0f} s).", "",
             f"A random-weight bf16 qwen3_moe checkpoint with Qwen3-30B-A3B's MoE shapes: {s.layers} decoder layers "
             f"(the real model has 48), hidden {s.hidden}, {s.experts} routed experts of intermediate "
             f"{s.expert_intermediate} ({human_bytes(rates.expert_bytes)} each, "
             f"{human_bytes(rates.expert_bytes * s.experts * s.layers)} in all), top-{s.top_k} renormalised, "
             f"{s.heads} heads / {s.kv_heads} KV heads of {s.head_dim}, the fixture tokenizer's vocabulary. Its LM "
             "head is the embedding with permuted rows, so greedy decoding takes a new token each step and routing "
             f"changes every step, with no locality beyond chance (the worst case for a cache). {held}. Per policy a "
             f"warm-up decode, then {cfg.repeats} greedy decode(s) of {cfg.tokens} tokens (ignore_eos) after a "
             f"{cfg.prompt}-token random prompt, batch 1; the figures are those of the decode with the median TPOT.",
             "",
             "TPOT = (last token's stamp - first's) / (tokens - 1), synchronized; loads / token over decode steps; "
             "host / pair and substituted: shares of routed pairs computed on the host, and served by an understudy "
             f"or dropped; copy GB/s = bytes the loader copied / the copies' summed durations ({timing}); copy busy "
             "= summed copy time / decode time; cache = slots x expert bytes; peak = torch.cuda.max_memory_allocated "
             "over load and decodes.", "",
             f"Rates measured here: {'pinned host->device' if cuda else 'host'} copy of one expert "
             f"{gbps(rates.expert_copy)} GB/s, of "
             f"{human_bytes(cfg.bulk_bytes)} {gbps(rates.bulk_copy)} GB/s, of 4 KiB {rates.small_copy_s * 1e6:.0f} us; "
             f"a batch-1 expert GEMV at {gbps(rates.device_expert)} GB/s of weights on the device and "
             f"{gbps(rates.host_expert)} GB/s on the host. `plan`: profile of {cfg.calib_samples} windows of "
             f"{cfg.seq_len} tokens of the fixture's calib.jsonl (loss sensitivity on {cfg.sensitivity_tokens} "
             "tokens), compiled at each budget for a target with these rates"
             + (f" (at {cfg.caches[0]}: alpha {plan['alpha']:g}, prefetch {onoff(plan['prefetch'])}, host compute "
                f"{onoff(plan['host_compute'])}, drops {onoff(plan['drops'])})" if plan else "") + "."
             + (f" The plan could not be made here, so it was not run ({info['plan_error']})."
                if info.get("plan_error") else ""), ""]
    lines += table(cells, cuda)
    lines += [""] + findings(cells, rates, s, cfg.tokens, test, cuda)
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="the same pipeline on the CPU with a tiny model (2 layers, hidden 64, 4 tokens); no --write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {Shape().layers})")
    ap.add_argument("--tokens", type=int, default=None, help=f"new tokens per decode (default {GpuBenchConfig.tokens})")
    ap.add_argument("--repeats", type=int, default=None, help=f"timed decodes (default {GpuBenchConfig.repeats})")
    ap.add_argument("--caches", default=None, help="budgets, comma-separated (default 25%%,50%%)")
    ap.add_argument("--commit", default=None, help="the commit to record where the tree has no git metadata")
    args = ap.parse_args()
    if args.dry_run_cpu and args.write:
        ap.error("--dry-run-cpu runs a tiny model on the CPU; its figures do not go into BENCHMARKS.md")
    if not args.dry_run_cpu and not args.device.startswith("cuda"):
        ap.error("--device names a CUDA device (cuda, cuda:1); the CPU pipeline is --dry-run-cpu")
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available; run it on a CUDA machine, or pass --dry-run-cpu",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_benchmarks import git_commit, machine
    from sections import write_section

    cfg = DRY_RUN if args.dry_run_cpu else replace(GpuBenchConfig(), device=args.device)
    if args.layers:
        cfg = replace(cfg, shape=replace(cfg.shape, layers=args.layers))
    cfg = replace(cfg, **{k: v for k, v in (("tokens", args.tokens), ("repeats", args.repeats)) if v})
    if args.caches:
        cfg = replace(cfg, caches=tuple(args.caches.split(",")))
    if cfg.tokens < 2 or cfg.repeats < 1:
        ap.error("--tokens must be at least 2 and --repeats at least 1")
    fixture, calib = SHARED / "fixtures" / "tiny-qwen2moe", SHARED / "fixtures" / "data" / "calib.jsonl"
    for need in (fixture / "tokenizer.json", calib):
        if not need.is_file():
            print(f"benchmarks/gpu.py: {need} is missing; set UNDERSTUDY_SHARED to the folder holding fixtures/",
                  file=sys.stderr)
            return 2
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model_dir = build_model(cfg.shape, fixture, device, cfg.seed)
    build_s = time.perf_counter() - t0
    log(f"model {model_dir.name}")
    rates = measure_rates(model_dir, device, cfg.timing_repeats, cfg.bulk_bytes)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    target = write_target(rates, device, name, model_dir.with_name(model_dir.name + "-work") / "target.yaml")
    plans, plan_error = {}, None
    if "plan" in cfg.policies:
        try:
            plans = make_plans(model_dir, cfg, calib, target, log)
        except Exception as exc:   # one device run is precious: the other policies and the test still run
            plan_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            cfg = replace(cfg, policies=tuple(p for p in cfg.policies if p != "plan"))
            log(f"plan not run: {plan_error}")
    plans_s = time.perf_counter() - t0 - build_s
    log("rates measured" + (", plans compiled" if plans else ""))
    cells = []
    for policy in cfg.policies:
        for cache in ([None] if policy == "resident" else cfg.caches):
            cells.append(run_policy(model_dir, cfg, policy, cache, plans.get(cache), log))
    t_test = time.perf_counter()
    test = exactness_test()
    test_s = time.perf_counter() - t_test
    log(f"exactness test: {test[0]}")
    info = {"command": shlex.join(["python", "benchmarks/gpu.py"] + sys.argv[1:]),
            "commit": git_commit() or args.commit, "machine": machine()["summary"], "device_name": name,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "run_s": time.perf_counter() - t0,
            "build_s": build_s, "plans_s": plans_s, "test_s": test_s, "plan_error": plan_error}
    heading = f"## GPU: Qwen3-30B-A3B shapes on {name}"
    text = section(cells, cfg, rates, test, info)
    print(f"{heading}\n\n{text}")
    log(f"elapsed {info['run_s']:.0f} s")
    if args.write:
        write_section(str(ROOT / "docs" / "BENCHMARKS.md"), "gpu", heading, text)
    return 1 if test[0] in ("failed", "timed out") or plan_error else 0


if __name__ == "__main__":
    sys.exit(main())
