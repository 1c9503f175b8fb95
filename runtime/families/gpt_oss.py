"""GPT-OSS: router with a bias, top-k on the logits then softmax over the k; experts fused on disk and in
memory, transposed ([E, H, 2I] with gate/up interleaved), with biases and a clamped SwiGLU; no shared expert."""
from runtime.families.arch import ExpertFormat, MoEArch, RouterRule

MODEL_TYPES = ("gpt_oss",)


def describe(config) -> MoEArch:
    return MoEArch(
        family="gpt_oss", model_type=config.model_type, num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(config.num_hidden_layers)),
        num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        router=RouterRule(scoring="softmax", logit_bias=True, topk_on_logits=True, norm_topk=True),
        experts=ExpertFormat(kind="gptoss", hidden=config.hidden_size, intermediate=config.intermediate_size,
                             swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit, per_expert=None,
                             fused={"gate_up": "experts.gate_up_proj", "gate_up_bias": "experts.gate_up_proj_bias",
                                    "down": "experts.down_proj", "down_bias": "experts.down_proj_bias"}),
        router_attr="router", returns_router_scores=True,
        max_positions=config.max_position_embeddings,
    )
