"""What quantizing experts costs in next-token loss, measured on the model, per MoE layer and importance class.

Classes, per MoE layer, from the profile's own importance I_e = mean over tokens routed to e of g_e(x) ||f_e(x)||
(profiler.importance): experts ranked by I_e (descending, ties by id); "high" = the first ceil(E/4), "mid" = the
next ones up to ceil(E/2), "low" = the rest (E = 16: 4, 4, 8; an expert never routed has I_e = 0: low).
By I_e, the weight of an expert's output per routed token, and not by its total: quantizing e costs about (pairs e
serves) x (cost per pair), the cost per pair grows with I_e, so a class groups experts of like cost per pair and the
compiler multiplies by each expert's own pair count. Three classes: importance is concentrated in a few experts of a
layer (the head, where 4-bit is most likely to hurt), the bottom half is where it is most likely free; 3 classes x
2 schemes keep the cost at 6 passes per MoE layer.

Passes: one exact pass, then for each MoE layer l, class c and scheme s (L x C x S passes; an empty class is
skipped) the experts of class c in layer l compute with their weights quantized by s (runtime.quantize, dequantized
into the compute dtype), every other expert exact; every pass runs the whole model on the same tokens. Stored as
sums, so shards merge:
  L{l}.quant_dnll_sum [C, S]      sum over predicted tokens of NLL(l, c, s) - NLL(exact)                nats
  L{l}.quant_kl_sum [C, S]        sum over predicted tokens of KL(p_exact || p_(l, c, s)) of the next-token
                                  distributions = sum_v p(v) (log p(v) - log q(v))                   nats
  L{l}.quant_pairs [C, S]         routed (token, expert) pairs of layer l that the quantized experts served
  L{l}.quant_weight_error [E, S]  ||W - W'||_F / ||W||_F over the expert's weight matrices (no pass: a property of
                                  the weights, taken from the first shard on merge)
  L{l}.quant_class [E]            the class of every expert (0 high, 1 mid, 2 low; recomputed on merge from the
                                  merged importance)
  quant.predicted, quant.positions  predicted tokens (each window's 2..L), token positions
  L{l}.quant_kl_window [N, C, S], L{l}.quant_pairs_window [N, C, S]   the KL and the pairs per calibration window n
                                  (format version 4; their sums over n are quant_kl_sum and quant_pairs), for the
                                  compiler's interval of a plan's predicted loss (compiler.loss_model)
Why the KL too: NLL(l, c, s) - NLL(exact) on N tokens is a first-order term, the loss gradient along the weight
error (either sign, as large as the effect itself until N is large), plus the second-order cost; the KL is >= 0, is
zero only when nothing changed, and its mean is the expected NLL increase on text the model predicts well (the
quantization-quality measure llama.cpp reports, `--kl-divergence`); docs/profile-format.md shows both on the fixture.
The layers' passes are independent, so processes may share them out by layer (profiler.distributed: each runs the
exact pass and its layers' passes over all the tokens, with the classes of the importance of all the tokens;
`join_layers` takes each layer's tensors from the process that measured it).
Memory: the exact pass's log-probabilities are kept in host memory, tokens x vocabulary x 4 bytes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from profiler.sensitivity import WindowTally, executor_swapped
from runtime.expert_compute import make_expert_fn, routed_output
from runtime.expert_store import ExpertStore
from runtime.families.arch import ExpertFormat
from runtime.quantize import (SCHEMES, Scheme, dequantize_expert, expert_matrices, expert_packed_bytes, kernel_copy,
                              kernel_expert, kernels_apply, quantize_expert)
from runtime.router import Routing

CLASSES = ("high", "mid", "low")
LAYER_MEASURES = ("quant_dnll_sum", "quant_kl_sum", "quant_pairs", "quant_weight_error", "quant_kl_window",
                  "quant_pairs_window")                                             # a layer's passes


def importance_classes(importance: np.ndarray) -> np.ndarray:
    """[E] class index (0 high, 1 mid, 2 low) of every expert from its importance I_e [E] (module docstring)."""
    e = len(importance)
    order = np.argsort(-importance, kind="stable")
    cls = np.full(e, 2, np.int64)
    cls[order[:math.ceil(e / 2)]] = 1
    cls[order[:math.ceil(e / 4)]] = 0
    return cls


def finalize_classes(stats: dict[str, np.ndarray], layers: list[int]) -> None:
    """(Re)compute every layer's `quant_class` from its accumulated importance sums and counts."""
    for l in layers:
        imp = stats[f"L{l}.importance_sum"] / np.maximum(stats[f"L{l}.act_count"], 1)
        stats[f"L{l}.quant_class"] = importance_classes(imp)


def roundtrip(w: dict[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One expert with its weight matrices quantized by `scheme` and dequantized back into their dtype."""
    dtype = w[next(iter(expert_matrices(fmt)))].dtype
    return dequantize_expert(quantize_expert(w, fmt, scheme), fmt, scheme, dtype)


def as_computed(w: dict[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme) -> dict:
    """One expert quantized by `scheme` as the runtime computes it on w's device (runtime.pooled_store): on the CPU
    from its codes with the weight-only kernels where they fit and pay (bf16/fp16), else dequantized (`roundtrip`)."""
    m = w[next(iter(expert_matrices(fmt)))]
    if kernels_apply(fmt, scheme, m.device, m.dtype):
        return kernel_expert(kernel_copy(quantize_expert(w, fmt, scheme), fmt, scheme), fmt, scheme)
    return roundtrip(w, fmt, scheme)


@dataclass(frozen=True)
class QuantTarget:
    layer: int
    experts: frozenset[int]
    scheme: Scheme


class QuantizingExecutor:
    """The exact routed output, except that the target's experts compute quantized; streams experts from the store."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self.store, self.device = store, device
        self.expert_fn = make_expert_fn(store.arch.experts)
        self.target: QuantTarget | None = None
        self.tally = WindowTally()           # routed pairs the target's experts served

    @torch.no_grad()
    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        t = self.target if self.target is not None and self.target.layer == layer else None
        fmt = self.store.arch.experts

        def weights_of(e: int) -> dict[str, torch.Tensor]:
            w = {k: v.to(self.device) for k, v in self.store.read(layer, e).items()}
            return as_computed(w, fmt, t.scheme) if t is not None and e in t.experts else w

        if t is not None:
            ids = torch.tensor(sorted(t.experts), device=routing.idx.device)
            self.tally.add(torch.isin(routing.idx, ids).sum(1))
        return routed_output(x, routing.idx, routing.weights, self.store.arch.num_experts, weights_of,
                             self.expert_fn)


@torch.no_grad()
def weight_errors(store: ExpertStore, layer: int, device: torch.device,
                  schemes: tuple[Scheme, ...] = SCHEMES) -> np.ndarray:
    """[E, S] ||W - W'||_F / ||W||_F over each expert's weight matrices (0 for an all-zero expert)."""
    fmt = store.arch.experts
    out = np.zeros((store.arch.num_experts, len(schemes)), np.float64)
    for e in range(store.arch.num_experts):
        w = {k: v.to(device) for k, v in store.read(layer, e).items()}
        norm2 = sum(float(torch.linalg.vector_norm(w[m].double()) ** 2) for m in expert_matrices(fmt))
        for s, scheme in enumerate(schemes):
            w2 = roundtrip(w, fmt, scheme)
            diff2 = sum(float(torch.linalg.vector_norm((w[m] - w2[m]).double()) ** 2) for m in expert_matrices(fmt))
            out[e, s] = math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0
    return out


@torch.no_grad()
def next_token_log_probs(model, tokens: np.ndarray, device: torch.device, batch_size: int):
    """Per batch of windows: (log q [B, L-1, V] float32 of the next token at every position, targets [B, L-1])."""
    for start in range(0, tokens.shape[0], batch_size):
        ids = torch.from_numpy(tokens[start:start + batch_size]).to(device)                 # [B, L]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()              # [B, L-1, V]
        yield torch.log_softmax(logits, dim=-1), ids[:, 1:]


@torch.no_grad()
def loss_change(model, tokens: np.ndarray, device: torch.device, batch_size: int, base: list[torch.Tensor],
                tally: WindowTally | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window n of tokens [N, L], each [N]: (sum over its predicted tokens of NLL - NLL(base), of KL(base ||
    model), nats; the pairs `tally` counted in its pass, 0 without one); `base` holds the exact pass's
    log-probabilities per batch (host memory), as `exact_log_probs` returns them."""
    dnll, kl, pairs = [], [], []
    for (logq, target), logp in zip(next_token_log_probs(model, tokens, device, batch_size), base):
        logp = logp.to(logq.device)
        pick = target[..., None]
        dnll.append((logp.gather(-1, pick) - logq.gather(-1, pick)).double().sum((1, 2)).cpu().numpy())
        terms = torch.where(logp > -math.inf, logp.exp() * (logp - logq), 0.0)             # [B, L-1, V]; 0 log 0 = 0
        kl.append(terms.sum(-1).double().sum(1).cpu().numpy())
        pairs.append(tally.take(logq.shape[0]) if tally is not None else np.zeros(logq.shape[0]))
    return np.concatenate(dnll), np.concatenate(kl), np.concatenate(pairs)


def exact_log_probs(model, tokens: np.ndarray, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """The exact pass's next-token log-probabilities per batch, [B, L-1, V] float32 each, in host memory."""
    return [logq.cpu() for logq, _ in next_token_log_probs(model, tokens, device, batch_size)]


@torch.no_grad()
def measure_quant_sensitivity(lm, store: ExpertStore, tokens: np.ndarray, stats: dict[str, np.ndarray],
                              batch_size: int = 4, progress: bool = True, layers: list[int] | None = None) -> dict:
    """Measure the sums of the module docstring on tokens [N, L] and add them (and the classes of every layer, from
    the importance already in `stats`) to `stats`; return the profile header's `quant_sensitivity` section.
    `layers`: the MoE layers whose passes to run (a rank's share, see `join_layers`; default all)."""
    t0 = time.perf_counter()
    finalize_classes(stats, list(lm.arch.moe_layers))
    layers = list(lm.arch.moe_layers) if layers is None else layers
    model, device, schemes = lm.model, lm.device, SCHEMES
    passes = 1 + sum(len(schemes) for l in layers for c in range(len(CLASSES))
                     if (stats[f"L{l}.quant_class"] == c).any())
    bar = tqdm(total=passes, desc="quantization", unit="pass", disable=not progress)
    with executor_swapped(lm.blocks, QuantizingExecutor(store, device)) as executor:
        base = exact_log_probs(model, tokens, device, batch_size)
        bar.update(1)
        for l in layers:
            dnll = np.zeros((tokens.shape[0], len(CLASSES), len(schemes)), np.float64)      # [N, C, S] nats
            kl, pairs = np.zeros_like(dnll), np.zeros_like(dnll)                             # nats, pairs
            for c in range(len(CLASSES)):
                experts = frozenset(np.flatnonzero(stats[f"L{l}.quant_class"] == c).tolist())
                for s, scheme in enumerate(schemes if experts else ()):
                    executor.target = QuantTarget(l, experts, scheme)
                    dnll[:, c, s], kl[:, c, s], pairs[:, c, s] = loss_change(model, tokens, device, batch_size,
                                                                             base, executor.tally)
                    bar.update(1)
            stats[f"L{l}.quant_dnll_sum"], stats[f"L{l}.quant_kl_sum"] = dnll.sum(0), kl.sum(0)
            stats[f"L{l}.quant_pairs"] = pairs.sum(0)
            stats[f"L{l}.quant_kl_window"], stats[f"L{l}.quant_pairs_window"] = kl, pairs
            stats[f"L{l}.quant_weight_error"] = weight_errors(store, l, device, schemes)
    bar.close()
    stats["quant.predicted"] = np.array([tokens.shape[0] * (tokens.shape[1] - 1)], np.int64)
    stats["quant.positions"] = np.array([tokens.size], np.int64)
    bias_dtype = lm.ckpt.float_dtype()
    return {"schemes": [s.describe() | {"expert_bytes": expert_packed_bytes(lm.arch.experts, s, bias_dtype)}
                        for s in schemes],
            "classes": list(CLASSES), "tokens": int(tokens.size), "passes": passes,
            "class_rule": "per layer, by importance rank: high = top ceil(E/4), mid = up to ceil(E/2), low = rest",
            "method": "one layer's experts of one class quantized (weight-only, symmetric), all others exact; "
                      "next-token NLL",
            "seconds": round(time.perf_counter() - t0, 2)}


def join_layers(parts: list[tuple[dict[str, np.ndarray], dict] | None], moe_layers: list[int],
                owner: Callable[[int], int]) -> tuple[dict[str, np.ndarray], dict]:
    """One measurement from ranks' shares of the layers (all with the same classes, over the same tokens): parts[r]
    = (the stats, the header section) of rank r, None where it had no layer; layer moe_layers[m]'s tensors from
    parts[owner(m)], the counts from parts[0]; the header's passes: the exact one plus every layer's, seconds: the
    slowest rank's."""
    stats = {k: parts[0][0][k] for k in ("quant.predicted", "quant.positions")}
    for m, l in enumerate(moe_layers):
        src = parts[owner(m)][0]
        stats.update({f"L{l}.{name}": src[f"L{l}.{name}"] for name in LAYER_MEASURES})
    heads = [part[1] for part in parts if part is not None]
    return stats, {**heads[0], "passes": 1 + sum(h["passes"] - 1 for h in heads),
                   "seconds": max(h["seconds"] for h in heads)}
