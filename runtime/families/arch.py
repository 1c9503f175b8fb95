"""What the runtime needs to know about one MoE checkpoint, resolved from its config.

A family module (one per model family, next to this file) turns an HF config into a `MoEArch`.
Everything downstream (expert store, router, MoE block, profiler) reads only this description,
never the family name, so a new family is one new file.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterRule:
    """How a router turns hidden states into expert choices and weights.

    logits = x @ W^T (+ b)                                  [T, E]
    gate   = softmax(logits) | sigmoid(logits)              [T, E]  the per-expert gate score
    choice = gate (+ correction bias), groups masked out     [T, E]  what top-k ranks by
    top-k on choice; weight_i = scaling * gate_i / (sum of the top-k gates if renormalised else 1)

    `topk_on_logits` (GPT-OSS) takes top-k on the logits and softmaxes over those k, which is the same
    as renormalising the full softmax's top-k; we keep HF's op order so the weights match bit for bit.
    """

    scoring: str = "softmax"            # "softmax" | "sigmoid"
    norm_topk: bool = False              # renormalise the top-k weights to sum to 1
    scaling: float = 1.0                 # routed_scaling_factor
    n_group: int = 1                     # expert groups (DeepSeek)
    topk_group: int = 1                  # groups kept per token
    group_score: str = "none"            # "none" | "max" (DeepSeek-V2) | "top2sum" (DeepSeek-V3)
    correction_bias: bool = False        # DeepSeek-V3 e_score_correction_bias, used for choice only
    logit_bias: bool = False             # GPT-OSS router bias
    topk_on_logits: bool = False         # GPT-OSS
    float32_logits: bool = False         # DeepSeek computes logits in float32
    weights_in_logits_dtype: bool = True  # Qwen/OLMoE cast the top-k weights back; Mixtral keeps float32
    renorm_eps: float = 0.0              # DeepSeek-V3 adds 1e-20 to the renormalising denominator


@dataclass(frozen=True)
class ExpertFormat:
    """One routed expert's computation and how its tensors are laid out on disk.

    In memory every expert is held in the layout HF computes with:
      "glu":    gate_up [2I, H], down [H, I];   y = down @ (act(gate_up[:I] @ x) * (gate_up[I:] @ x))
      "gptoss": gate_up [H, 2I] (gate/up interleaved), gate_up_bias [2I], down [I, H], down_bias [H];
                y = clamp-swiglu(x @ gate_up + b) @ down + b_down
    On disk, `per_expert` names one tensor per expert ({e} is the expert id, relative to the block);
    `fused` names one stacked tensor [E, ...] per weight, read one expert at a time with get_slice.
    """

    kind: str                          # "glu" | "gptoss"
    hidden: int                        # H
    intermediate: int                  # I
    activation: str = "silu"           # HF ACT2FN name (glu)
    swiglu_alpha: float = 1.702        # gptoss
    swiglu_limit: float = 7.0          # gptoss
    per_expert: tuple[str, str, str] | None = ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
                                               "experts.{e}.down_proj.weight")
    fused: dict[str, str] = field(default_factory=lambda: {"gate_up": "experts.gate_up_proj",
                                                           "down": "experts.down_proj"})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """In-memory tensor shapes of one expert."""
        h, i = self.hidden, self.intermediate
        if self.kind == "gptoss":
            return {"gate_up": (h, 2 * i), "gate_up_bias": (2 * i,), "down": (i, h), "down_bias": (h,)}
        return {"gate_up": (2 * i, h), "down": (h, i)}

    def numel(self) -> int:
        n = 0
        for s in self.shapes().values():
            k = 1
            for d in s:
                k *= d
            n += k
        return n


@dataclass(frozen=True)
class MoEArch:
    """A resolved MoE checkpoint: which layers are MoE, their router rule, experts and shared experts."""

    family: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]        # model layer indices whose MLP is a routed MoE block
    num_experts: int                   # E
    top_k: int                         # k
    router: RouterRule
    experts: ExpertFormat
    block_path: str = "model.layers.{l}.mlp"       # the MoE block's module path in memory
    disk_block_path: str = "model.layers.{l}.mlp"  # its tensor-name prefix on disk
    router_attr: str = "gate"                       # the router submodule inside the block
    shared_attrs: tuple[str, ...] = ()              # shared-expert submodules kept resident
    shared_gate_attr: str | None = None             # sigmoid gate on the shared expert (Qwen2-MoE)
    returns_router_scores: bool = False             # the block returns (hidden, router_scores) (GPT-OSS)
    max_positions: int | None = None

    def expert_key_prefix(self, layer: int) -> str:
        return self.disk_block_path.format(l=layer) + "."
