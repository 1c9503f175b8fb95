"""Mixtral: softmax router, top-k renormalised, float32 weights; experts w1 (gate), w3 (up), w2 (down) on disk
under `block_sparse_moe`; no shared expert; every layer is MoE."""
from runtime.families.arch import ExpertFormat, MoEArch, RouterRule

MODEL_TYPES = ("mixtral",)


def describe(config) -> MoEArch:
    return MoEArch(
        family="mixtral", model_type=config.model_type, num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(config.num_hidden_layers)),
        num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        router=RouterRule(scoring="softmax", norm_topk=True, weights_in_logits_dtype=False),
        experts=ExpertFormat(kind="glu", hidden=config.hidden_size, intermediate=config.intermediate_size,
                             activation=config.hidden_act,
                             per_expert=("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight")),
        disk_block_path="model.layers.{l}.block_sparse_moe",
        max_positions=config.max_position_embeddings,
    )
