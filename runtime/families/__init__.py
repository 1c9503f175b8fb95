"""Model families: HF config -> `MoEArch`. `resolve_arch` is the one entry point."""
from __future__ import annotations

from artifacts.errors import UserError
from runtime.families import deepseek, gpt_oss, mixtral, qwen_moe
from runtime.families.arch import ExpertFormat, MoEArch, RouterRule

_FAMILIES = (mixtral, qwen_moe, deepseek, gpt_oss)


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in _FAMILIES for t in f.MODEL_TYPES)


def resolve_arch(config) -> MoEArch:
    """The MoE description of an HF config; a clear error for a family we do not support or a dense model."""
    model_type = getattr(config, "model_type", None)
    for family in _FAMILIES:
        if model_type in family.MODEL_TYPES:
            arch = family.describe(config)
            if not arch.moe_layers or arch.num_experts <= 1:
                raise UserError(f"model type '{model_type}' is configured without routed experts "
                                f"(num_experts={arch.num_experts}, MoE layers={list(arch.moe_layers)}); "
                                "Understudy needs a Mixture-of-Experts checkpoint")
            return arch
    raise UserError(f"model type '{model_type}' is not a supported Mixture-of-Experts family; supported: "
                    f"{', '.join(supported_model_types())}")


__all__ = ["ExpertFormat", "MoEArch", "RouterRule", "resolve_arch", "supported_model_types"]
