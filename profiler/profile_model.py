"""`profile(...)`: run a calibration set through a MoE model with offloaded experts and build a `Profile`, in one
process or sharded over torchrun's (profiler.distributed)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from artifacts.errors import UserError
from artifacts.header import new_header
from artifacts.profile import FORMAT, FORMAT_VERSION, Profile
from profiler.calibration import Calibration, build_calibration, load_tokenizer
from profiler.distributed import Shards
from profiler.merge import add_stats, combine
from profiler.probe_executor import ProbeExecutor
from profiler.quant_sensitivity import finalize_classes, join_layers, measure_quant_sensitivity
from profiler.sensitivity import CUTS, OPTIONS, join_passes, measure_sensitivity
from profiler.trace import TraceRecorder
from runtime.expert_store import ExpertStore
from runtime.fingerprint import model_fingerprint
from runtime.families import resolve_arch
from runtime.model_loader import LoadedModel, load_config, load_model, next_layer_router


@dataclass(frozen=True)
class ProfileConfig:
    """Settings of one profiling run; the CLI maps its flags onto these fields."""

    samples: int = 64                 # calibration windows
    seq_len: int | None = None        # tokens per window (default: 256, or the model's context if shorter)
    seed: int = 0                     # window and probe sampling
    text_field: str = "text"
    device: str = "cpu"
    dtype: str | None = None          # default: float32 on CPU (measurement precision), the checkpoint's on CUDA
    batch_size: int = 4               # windows per forward pass
    probe_tokens: int = 2048          # tokens on which every expert is run (similarity)
    trace_extra: int | None = None    # m: experts traced beyond the top k (default k)
    cluster_threshold: float = 0.5    # cut of the average-linkage tree on 1 - cosine
    tokenizer: str | None = None      # default: the model directory
    sensitivity_tokens: int = 4096    # calibration tokens for the loss cost of substitutions (0: skip)
    quant_tokens: int = 1024          # calibration tokens for the loss cost of quantizing experts (0: skip)


@torch.no_grad()
def _kv_bytes_per_token(lm: LoadedModel, elsize: int) -> int:
    """Bytes the HF KV cache grows by per token (all layers), measured on a one-token forward.
    The routed experts do not matter for the cache's size, so they are skipped (zero output) for this pass."""
    saved = {l: b.executor for l, b in lm.blocks.items()}
    for b in lm.blocks.values():
        b.executor = lambda layer, x, routing: torch.zeros_like(x)
    try:
        cache = DynamicCache(config=lm.config)
        lm.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=lm.device), cache=cache, use_cache=True)
    finally:
        for l, b in lm.blocks.items():
            b.executor = saved[l]
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * elsize
    return total


def model_section(lm: LoadedModel, store: ExpertStore, model_dir: str | Path) -> dict:
    """Identity and sizes of the model as the checkpoint stores it (what the compiler budgets with): routed experts
    in their disk format (`checkpoint_dtype`: a dtype, or a quantized checkpoint's packed format with its real
    bytes per expert), dense weights and the KV cache in the checkpoint's float dtype (what a run holds them in)."""
    arch = lm.arch
    elsize = lm.ckpt.float_dtype().itemsize
    expert_bytes = store.disk_expert_bytes
    dense_params = sum(t.numel() for t in {p.data_ptr(): p for p in lm.model.parameters()}.values())
    return {"path": str(Path(model_dir).resolve()), "fingerprint": model_fingerprint(arch, lm.config, lm.ckpt),
            "model_type": arch.model_type, "family": arch.family, "num_layers": arch.num_layers,
            "moe_layers": list(arch.moe_layers), "num_experts": arch.num_experts, "top_k": arch.top_k,
            "hidden_size": arch.experts.hidden, "expert_intermediate": arch.experts.intermediate,
            "checkpoint_dtype": store.disk_format,
            "expert_params": arch.experts.numel(), "expert_bytes": expert_bytes,
            "routed_expert_bytes": expert_bytes * arch.num_experts * len(arch.moe_layers),
            "dense_params": dense_params, "dense_bytes": dense_params * elsize,
            "kv_bytes_per_token": _kv_bytes_per_token(lm, elsize),
            "max_positions": arch.max_positions}


@dataclass(frozen=True)
class _Run:
    """What every step of a run reads: the model (its MoE blocks run the profiler's executor), the calibration set,
    and the probe tokens, drawn once from all the calibration tokens (so every shard draws the same)."""

    lm: LoadedModel
    store: ExpertStore
    calib: Calibration
    model_info: dict
    seq_len: int
    width: int                # trace width W = k + m
    probe: np.ndarray         # [N * L] bool
    windows: tuple[int, int]  # [lo, hi): this rank's windows of the observation pass


def profile(model_dir: str | Path, data: str, config: ProfileConfig = ProfileConfig(), progress: bool = True,
            shards: Shards = Shards()) -> Profile | None:
    """Profile `model_dir` on calibration `data`. Raises UserError for bad input.

    Passes, in order: the observation pass (trace, routing, importance, similarity), the loss sensitivity passes,
    the quantization passes (classes from the importance). Sharded (`shards`: a rank of torchrun's process group,
    profiler.distributed.torchrun_shards), every rank runs its share of each (profiler.distributed says which), and
    rank 0 returns the reduced profile, a single run's up to float64 addition order; the other ranks return None."""
    t0 = time.perf_counter()
    progress = progress and shards.main
    run = shards.agree(lambda: _prepare(model_dir, data, config, shards))
    observed = shards.agree(lambda: _observe(run, config, progress))
    sensitivity = shards.agree(lambda: _sensitivity(run, config, shards, progress))
    quant = None
    if config.quant_tokens > 0:
        keys = [f"L{l}.{k}" for l in run.lm.arch.moe_layers for k in ("importance_sum", "act_count")]
        totals = add_stats(shards.all_gather({k: observed.stats[k] for k in keys}), keys)     # all the tokens'
        quant = shards.agree(lambda: _quant(run, config, totals, shards, progress))
    parts = shards.gather((observed, sensitivity, quant))
    return None if parts is None else _reduce(parts, run, config, shards, time.perf_counter() - t0)


def _prepare(model_dir: str | Path, data: str, config: ProfileConfig, shards: Shards) -> _Run:
    """The cheap checks first (config, sequence length, tokenizer, calibration text, its share), then the model."""
    if min(config.probe_tokens, config.sensitivity_tokens, config.quant_tokens) < 0 or config.batch_size < 1:
        raise UserError("--probe-tokens, --sensitivity-tokens and --quant-tokens must be >= 0 and --batch-size >= 1")
    arch = resolve_arch(load_config(model_dir))
    seq_len = config.seq_len or min(256, arch.max_positions or 256)
    if arch.max_positions is not None and seq_len > arch.max_positions:
        raise UserError(f"--seq-len {seq_len} is over the model's limit of {arch.max_positions} positions; "
                        f"use --seq-len {arch.max_positions} or less")
    tok = load_tokenizer(str(model_dir), config.tokenizer)
    calib = build_calibration(data, tok, config.samples, seq_len, config.seed, config.text_field)
    windows = shards.windows(calib.tokens.shape[0], config.batch_size)
    lm = load_model(model_dir, config.device, config.dtype or ("float32" if config.device == "cpu" else None))
    width = min(arch.num_experts, arch.top_k + (arch.top_k if config.trace_extra is None else config.trace_extra))
    store = ExpertStore(lm.ckpt, arch, lm.dtype, mode="mmap")    # float experts in lm.dtype (quantized: dequantized)
    total = calib.tokens.size
    probe = np.zeros(total, bool)
    probe[np.random.default_rng(config.seed).choice(total, size=min(config.probe_tokens, total), replace=False)] = True
    return _Run(lm=lm, store=store, calib=calib, model_info=model_section(lm, store, model_dir), seq_len=seq_len,
                width=width, probe=probe, windows=windows)


def _observe(run: _Run, config: ProfileConfig, progress: bool) -> Profile:
    """The observation pass over this rank's windows: a shard profile (sums, counts and trace of those windows,
    numbered from 0; no clusters, no measurement passes)."""
    (lo, hi), lm, s = run.windows, run.lm, run.seq_len
    trace = TraceRecorder(list(lm.arch.moe_layers), run.width)
    executor = ProbeExecutor(run.store, lm.device, trace, next_router=next_layer_router(lm))
    for block in lm.blocks.values():
        block.executor = executor
    bar = tqdm(total=hi - lo, desc="profiling", unit="sample", disable=not progress)
    with torch.no_grad():
        for start in range(lo, hi, config.batch_size):
            batch = run.calib.tokens[start:min(start + config.batch_size, hi)]                 # [B, L]
            rows = np.flatnonzero(run.probe[start * s:(start + len(batch)) * s])
            executor.begin_batch(torch.from_numpy(rows).to(lm.device))
            lm.model(input_ids=torch.from_numpy(batch).to(lm.device), use_cache=False)
            trace.add_tokens(batch, np.arange(start - lo, start - lo + len(batch)))
            bar.update(len(batch))
    bar.close()
    stats: dict[str, np.ndarray] = {}
    for l, rec in executor.layers.items():
        for part in (rec.routing, rec.importance, rec.similarity):
            stats.update({f"L{l}.{k}": v for k, v in part.arrays().items()})
    return Profile(header=_header(run, config, probe_tokens=int(run.probe[lo * s:hi * s].sum())), stats=stats,
                   trace=trace.arrays())


def _measured_windows(run: _Run, tokens: int) -> np.ndarray:
    """The first windows of the calibration set holding `tokens` tokens (at least one), [n, L]."""
    n = run.calib.tokens.shape[0]
    return run.calib.tokens[:max(1, min(n, tokens // run.seq_len))]


def _sensitivity(run: _Run, config: ProfileConfig, shards: Shards, progress: bool) -> dict[str, np.ndarray] | None:
    """This rank's share of the loss sensitivity passes (None: not measured, or no pass is this rank's)."""
    if config.sensitivity_tokens == 0 or not any(shards.owns(u) for u in range(len(OPTIONS) * len(CUTS))):
        return None
    lm = run.lm
    return measure_sensitivity(lm.model, lm.blocks, run.store, _measured_windows(run, config.sensitivity_tokens),
                               lm.device, config.batch_size, progress, runs=shards.owns)


def _quant(run: _Run, config: ProfileConfig, totals: dict[str, np.ndarray], shards: Shards,
           progress: bool) -> tuple[dict[str, np.ndarray], dict] | None:
    """This rank's share of the quantization passes (its MoE layers), with the classes of `totals`' importance;
    (the stats it measured, the header section), or None when no layer is this rank's."""
    layers = [l for m, l in enumerate(run.lm.arch.moe_layers) if shards.owns(m)]
    if not layers:
        return None
    stats = dict(totals)
    head = measure_quant_sensitivity(run.lm, run.store, _measured_windows(run, config.quant_tokens), stats,
                                     config.batch_size, progress, layers=layers)
    return {k: v for k, v in stats.items() if k not in totals}, head


def _reduce(parts: list, run: _Run, config: ProfileConfig, shards: Shards, seconds: float) -> Profile:
    """The profile from every rank's (observation shard, sensitivity share, quantization share): the observation
    shards by merge's rules (sums and counts added, traces concatenated in rank order, clusters from the summed
    cosines), each measurement pass from the rank that ran it, the classes from the summed importance."""
    prof = combine([observed for observed, _, _ in parts])
    header, layers = prof.header, list(run.lm.arch.moe_layers)
    header["calibration"] = [run.calib.source]
    if config.sensitivity_tokens > 0:
        prof.stats.update(join_passes([sens for _, sens, _ in parts], shards.owner))
        header["sensitivity"] = {"options": list(OPTIONS), "cuts": list(CUTS),
                                 "tokens": int(_measured_windows(run, config.sensitivity_tokens).size),
                                 "method": "every low pair of every MoE layer replaced at once; mean next-token NLL"}
    if config.quant_tokens > 0:
        stats, header["quant_sensitivity"] = join_layers([q for _, _, q in parts], layers, shards.owner)
        prof.stats.update(stats)
        finalize_classes(prof.stats, layers)
    header["run"] = {"device": str(run.lm.device), "dtype": str(run.lm.dtype).replace("torch.", ""),
                     "seconds": round(seconds, 2), "world_size": shards.world_size}
    return prof


def _header(run: _Run, config: ProfileConfig, probe_tokens: int) -> dict:
    """A shard's header: the measurement sections and the calibration record are the reduced profile's to fill."""
    return new_header(
        FORMAT, FORMAT_VERSION,
        model=run.model_info,
        calibration=[],
        settings={k: v for k, v in asdict(config).items() if k not in ("device", "dtype", "tokenizer")}
        | {"seq_len": run.seq_len},
        probe={"tokens": probe_tokens},
        clustering={"method": "agglomerative, average linkage", "distance": "1 - mean cosine (symmetrised)",
                    "threshold": config.cluster_threshold},
        trace={"width": run.width, "tokens": 0},
        sensitivity=None,
        quant_sensitivity=None,
        run={},
    )
