"""Qwen2-MoE, Qwen3-MoE and OLMoE: softmax router, optional top-k renormalisation (off by default for
Qwen2-MoE and OLMoE); Qwen2-MoE adds one shared expert behind a sigmoid gate; Qwen2/3-MoE may keep dense MLP
layers (`mlp_only_layers`, `decoder_sparse_step`)."""
from runtime.families.arch import ExpertFormat, MoEArch, RouterRule

MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe")


def _moe_layers(config) -> tuple[int, ...]:
    if config.model_type == "olmoe":
        return tuple(range(config.num_hidden_layers))
    only_dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return tuple(l for l in range(config.num_hidden_layers)
                 if l not in only_dense and config.num_experts > 0 and (l + 1) % step == 0)


def describe(config) -> MoEArch:
    shared = config.model_type == "qwen2_moe" and getattr(config, "shared_expert_intermediate_size", 0) > 0
    inter = config.intermediate_size if config.model_type == "olmoe" else config.moe_intermediate_size
    return MoEArch(
        family="qwen_moe", model_type=config.model_type, num_layers=config.num_hidden_layers,
        moe_layers=_moe_layers(config), num_experts=config.num_experts, top_k=config.num_experts_per_tok,
        router=RouterRule(scoring="softmax", norm_topk=bool(getattr(config, "norm_topk_prob", False))),
        experts=ExpertFormat(kind="glu", hidden=config.hidden_size, intermediate=inter,
                             activation=config.hidden_act),
        shared_attrs=("shared_expert",) if shared else (),
        shared_gate_attr="shared_expert_gate" if shared else None,
        max_positions=config.max_position_embeddings,
    )
