"""DeepSeek-V2 and -V3: the first `first_k_dense_replace` layers are dense; shared experts always run.
V2: softmax, greedy or group-limited greedy (group score = max), scaled, not renormalised.
V3: sigmoid gates, choice = gate + e_score_correction_bias, groups scored by the sum of their top-2,
renormalised (+1e-20) and scaled."""
from runtime.families.arch import ExpertFormat, MoEArch, RouterRule

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def describe(config) -> MoEArch:
    v3 = config.model_type == "deepseek_v3"
    if v3:
        rule = RouterRule(scoring="sigmoid", norm_topk=bool(config.norm_topk_prob),
                          scaling=float(config.routed_scaling_factor), n_group=config.n_group,
                          topk_group=config.topk_group, group_score="top2sum", correction_bias=True,
                          float32_logits=True, weights_in_logits_dtype=False, renorm_eps=1e-20)
    else:
        grouped = config.topk_method == "group_limited_greedy"
        rule = RouterRule(scoring="softmax", norm_topk=False, scaling=float(config.routed_scaling_factor),
                          n_group=config.n_group if grouped else 1, topk_group=config.topk_group if grouped else 1,
                          group_score="max" if grouped else "none", float32_logits=True,
                          weights_in_logits_dtype=False)
    first_dense = config.first_k_dense_replace
    return MoEArch(
        family="deepseek", model_type=config.model_type, num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(first_dense, config.num_hidden_layers)),
        num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, router=rule,
        experts=ExpertFormat(kind="glu", hidden=config.hidden_size, intermediate=config.moe_intermediate_size,
                             activation=config.hidden_act),
        shared_attrs=("shared_experts",) if getattr(config, "n_shared_experts", 0) else (),
        max_positions=config.max_position_embeddings,
    )
