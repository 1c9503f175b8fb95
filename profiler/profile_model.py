"""`profile(...)`: run a calibration set through a MoE model with offloaded experts and build a `Profile`."""
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
from profiler.calibration import build_calibration, load_tokenizer
from profiler.clustering import cluster_experts
from profiler.probe_executor import ProbeExecutor
from profiler.quant_sensitivity import measure_quant_sensitivity
from profiler.sensitivity import CUTS, OPTIONS, measure_sensitivity
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


def finalize_clusters(stats: dict[str, np.ndarray], layers: list[int], threshold: float) -> None:
    """(Re)compute the cluster labels of every layer from its accumulated cosine sums."""
    for l in layers:
        sim = stats[f"L{l}.cos_sum"] / max(int(stats[f"L{l}.probe_count"][0]), 1)
        stats[f"L{l}.clusters"] = cluster_experts(sim, threshold)


def profile(model_dir: str | Path, data: str, config: ProfileConfig = ProfileConfig(),
            progress: bool = True) -> Profile:
    """Profile `model_dir` on calibration `data`. Raises UserError for bad input."""
    t0 = time.perf_counter()
    if min(config.probe_tokens, config.sensitivity_tokens, config.quant_tokens) < 0 or config.batch_size < 1:
        raise UserError("--probe-tokens, --sensitivity-tokens and --quant-tokens must be >= 0 and --batch-size >= 1")
    # the cheap checks first (config, sequence length, tokenizer, calibration text), then the model's weights
    arch = resolve_arch(load_config(model_dir))
    seq_len = config.seq_len or min(256, arch.max_positions or 256)
    if arch.max_positions is not None and seq_len > arch.max_positions:
        raise UserError(f"--seq-len {seq_len} is over the model's limit of {arch.max_positions} positions; "
                        f"use --seq-len {arch.max_positions} or less")
    tok = load_tokenizer(str(model_dir), config.tokenizer)
    calib = build_calibration(data, tok, config.samples, seq_len, config.seed, config.text_field)
    lm = load_model(model_dir, config.device, config.dtype or ("float32" if config.device == "cpu" else None))

    width = min(arch.num_experts, arch.top_k + (arch.top_k if config.trace_extra is None else config.trace_extra))
    trace = TraceRecorder(list(arch.moe_layers), width)
    store = ExpertStore(lm.ckpt, arch, lm.dtype, mode="mmap")    # float experts in lm.dtype (quantized: dequantized)
    model_info = model_section(lm, store, model_dir)
    executor = ProbeExecutor(store, lm.device, trace, next_router=next_layer_router(lm))
    for block in lm.blocks.values():
        block.executor = executor

    n, s = calib.tokens.shape
    total = n * s
    rng = np.random.default_rng(config.seed)
    probe = np.zeros(total, bool)
    probe[rng.choice(total, size=min(config.probe_tokens, total), replace=False)] = True

    layers = list(arch.moe_layers)
    bar = tqdm(total=n, desc="profiling", unit="sample", disable=not progress)
    with torch.no_grad():
        for start in range(0, n, config.batch_size):
            batch = calib.tokens[start:start + config.batch_size]
            rows = np.flatnonzero(probe[start * s:(start + len(batch)) * s])
            executor.begin_batch(torch.from_numpy(rows).to(lm.device))
            lm.model(input_ids=torch.from_numpy(batch).to(lm.device), use_cache=False)
            trace.add_tokens(batch, np.arange(start, start + len(batch)))
            bar.update(len(batch))
    bar.close()

    stats: dict[str, np.ndarray] = {}
    for l, rec in executor.layers.items():
        for part in (rec.routing, rec.importance, rec.similarity):
            stats.update({f"L{l}.{k}": v for k, v in part.arrays().items()})
    finalize_clusters(stats, layers, config.cluster_threshold)
    sensitivity = None
    if config.sensitivity_tokens > 0:
        windows = max(1, min(n, config.sensitivity_tokens // s))
        stats.update(measure_sensitivity(lm.model, lm.blocks, store, calib.tokens[:windows], lm.device,
                                         config.batch_size, progress))
        sensitivity = {"options": list(OPTIONS), "cuts": list(CUTS), "tokens": int(windows * s),
                       "method": "every low pair of every MoE layer replaced at once; mean next-token NLL"}
    quant = None
    if config.quant_tokens > 0:
        windows = max(1, min(n, config.quant_tokens // s))
        quant = measure_quant_sensitivity(lm, store, calib.tokens[:windows], stats, config.batch_size, progress)

    header = new_header(
        FORMAT, FORMAT_VERSION,
        model=model_info,
        calibration=[calib.source],
        settings={k: v for k, v in asdict(config).items() if k not in ("device", "dtype", "tokenizer")}
        | {"seq_len": seq_len},
        probe={"tokens": int(probe.sum())},
        clustering={"method": "agglomerative, average linkage", "distance": "1 - mean cosine (symmetrised)",
                    "threshold": config.cluster_threshold},
        trace={"width": width, "tokens": total},
        sensitivity=sensitivity,
        quant_sensitivity=quant,
        run={"device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
             "seconds": round(time.perf_counter() - t0, 2)},
    )
    return Profile(header=header, stats=stats, trace=trace.arrays())
