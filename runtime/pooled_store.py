"""The expert store as a precision plan's cache sees it: each expert at its pool's precision (runtime.policy.pools).

An expert held at the checkpoint's format comes from the `ExpertStore` as before. An expert a plan holds at a
weight-only scheme (runtime.quantize: int8 per channel, int4 groups of 32) comes from its quantized copy, made once
when the run starts by quantizing the store's expert (the same function, on the same weights, as the profile that
measured what it costs), and kept in host memory (pinned on CUDA): the link then moves the copy's bytes, and a cache
slot of that pool holds them. Right before compute, `materialize` makes a slot's copy computable: on the CPU, a GLU
expert's matrices compute from their codes with torch's weight-only kernels (runtime.quantize.KernelMatrix; int4
copies are then made in the kernel's tile layout, the same bytes); elsewhere (CUDA, GPT-OSS's experts) the copy is
dequantized into the compute dtype (a fresh workspace, as for a quantized checkpoint's packed experts). A host
computation reads the exact expert.

Why copies made at load and not files written by moe-compile: the compiler is pure (no torch, no weights), the
copies are a deterministic function of the checkpoint (same codes on every run, checked by the tests), and writing
them would duplicate up to half a model's bytes next to each plan. The cost: one quantization pass over the quantized
experts when the run starts (measured by the benchmark), and their bytes in host memory (at most half the routed
experts' bytes: int8 copies; int4 about 28%).
Why not torchao / HQQ / optimum-quanto: the cache preallocates every slot as plain tensors of fixed shapes and the
copies must be exactly the codes the profiler measured; torch's own CPU kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, the ones torchao calls on the CPU) compute from those codes with no tensor subclass,
and CUDA's int4 kernel wants another tile layout that no test here can check (docs/design.md).
"""
from __future__ import annotations

from typing import Mapping

import torch

from artifacts.errors import UserError
from runtime.expert_store import ExpertStore
from runtime.formats import TensorSpec, materialize
from runtime.policy.pools import Pools
from runtime.quantize import (Scheme, dequantize_expert, expert_specs, kernel_copy, kernel_expert, kernels_apply,
                              quantize_expert)


class PooledStore:
    """An ExpertStore plus the quantized copies a precision plan's pools hold; duck-types the store for the loader
    (`copy_into`) and the executor (`read`, `materialize`)."""

    def __init__(self, store: ExpertStore, pools: Pools, schemes: Mapping[str, Scheme], pin: bool = False,
                 compute: tuple[torch.device, torch.dtype] | None = None):
        assert store.held is None, "precision pools quantize float experts"
        self.base, self.pools, self.arch = store, pools, store.arch
        self.held = None
        self.schemes = {n: schemes[n] for n in pools.names[1:]}
        # per scheme: whether its experts compute from their codes (CPU kernels) on `compute` (device, dtype), rather
        # than dequantized
        self.kernels = {n: compute is not None and kernels_apply(self.arch.experts, s, *compute)
                        for n, s in self.schemes.items()}
        bias = store.dtype
        self.pool_specs: tuple[dict[str, TensorSpec], ...] = (dict(store.specs),) + tuple(
            expert_specs(self.arch.experts, self.schemes[n], bias) for n in pools.names[1:])
        for p, n in enumerate(pools.names):
            have = sum(s.nbytes for s in self.pool_specs[p].values())
            if have != pools.bytes[p]:           # a plan made for another expert layout: refuse before any work
                raise UserError(f"the plan counts a {n} expert as {pools.bytes[p]} B, this model's is {have} B; "
                                "profile and compile this checkpoint")
        self._copies: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for l in self.arch.moe_layers:
            for e in range(self.arch.num_experts):
                name = pools.quantized(l, e)
                if name is not None:
                    q = quantize_expert(store.read(l, e), self.arch.experts, self.schemes[name])
                    if self.kernels[name]:
                        q = kernel_copy(q, self.arch.experts, self.schemes[name])
                    self._copies[(l, e)] = {k: (v.pin_memory() if pin else v) for k, v in q.items()}

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert at the checkpoint's format."""
        return self.base.expert_bytes

    @property
    def copies(self) -> int:
        """Experts held as quantized copies."""
        return len(self._copies)

    @property
    def copy_bytes(self) -> int:
        """Host bytes of the quantized copies."""
        return sum(t.numel() * t.element_size() for w in self._copies.values() for t in w.values())

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the experts held at the checkpoint's format."""
        return self.base.dtype

    @property
    def format_name(self) -> str:
        return self.base.format_name

    def read(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """The exact expert (host computations)."""
        return self.base.read(layer, e)

    def copy_into(self, layer: int, e: int, dst: dict[str, torch.Tensor], non_blocking: bool = False) -> int:
        """Copy expert e at its pool's precision into a slot of that pool; returns the bytes moved."""
        src = self._copies.get((layer, e))
        if src is None:
            return self.base.copy_into(layer, e, dst, non_blocking=non_blocking)
        for k, t in dst.items():
            t.copy_(src[k], non_blocking=non_blocking)
        return sum(t.numel() * t.element_size() for t in dst.values())

    def computes_as_held(self, dtype: torch.dtype) -> bool:
        """False: a slot may hold a quantized copy, so every compute goes through `materialize`."""
        return False

    def materialize(self, layer: int, e: int, w: Mapping[str, torch.Tensor], dtype: torch.dtype,
                    slot: bool = True) -> dict[str, torch.Tensor]:
        """Weights to compute with: a slot of a quantized pool as kernel matrices or dequantized, else as the plain
        store's."""
        name = self.pools.quantized(layer, e) if slot else None
        if name is None:
            return materialize(w, None, dtype)
        if self.kernels[name]:
            return kernel_expert(w, self.arch.experts, self.schemes[name])
        return dequantize_expert(w, self.arch.experts, self.schemes[name], dtype)
