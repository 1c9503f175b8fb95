"""A short human summary of a profile: per layer, the most important experts, the most similar pairs, clusters."""
from __future__ import annotations

import numpy as np

from artifacts.profile import Profile


def summarize(p: Profile, top: int = 3) -> str:
    m = p.header["model"]
    cal = p.header["calibration"]
    lines = [f"profile of {m['model_type']} ({len(p.moe_layers)} MoE layers x {p.num_experts} experts, top-{p.top_k}); "
             f"{sum(c['tokens'] for c in cal)} calibration tokens, {p.header['probe']['tokens']} probe tokens",
             f"{'layer':>5}  {'most important (id: I, share)':<44} {'most similar pairs (cos)':<38} clusters"]
    for l in p.moe_layers:
        imp, share, sim = p.importance[l], p.importance_share[l], p.similarity[l].copy()
        best = np.argsort(-imp, kind="stable")[:top]
        imp_s = ", ".join(f"{e}: {imp[e]:.3g} {share[e]:.0%}" for e in best)
        iu = np.triu_indices(p.num_experts, 1)
        pair_sim = (sim[iu] + sim.T[iu]) / 2
        order = np.argsort(-pair_sim, kind="stable")[:top]
        pairs = ", ".join(f"{iu[0][i]}-{iu[1][i]} {pair_sim[i]:.2f}" for i in order)
        lines.append(f"{l:>5}  {imp_s:<44} {pairs:<38} {len(set(p.clusters[l].tolist()))}")
    return "\n".join(lines)
