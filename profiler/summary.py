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
    lines += sensitivity_table(p)
    lines += quant_table(p)
    return "\n".join(lines)


def sensitivity_table(p: Profile) -> list[str]:
    """Measured loss of replacing the low pairs (s_i <= cut * S(k+1)), per option: the NLL increase per token and
    the replaced pairs per token (all MoE layers)."""
    s = p.sensitivity
    if s is None:
        return ["loss sensitivity: not measured (--sensitivity-tokens 0)"]
    head = p.header["sensitivity"]
    d = s["dnll_sum"] / max(float(s["predicted"][0]), 1.0)
    n = s["pair_count"] / max(float(s["positions"][0]), 1.0)
    cuts = head["cuts"]
    lines = [f"loss sensitivity on {head['tokens']} tokens: NLL increase in millinats per token "
             "(replaced pairs per token) when every low pair is replaced",
             f"{'option':>7}  " + "  ".join(f"{'s <= ' + format(c, 'g') + ' S(k+1)':>18}" for c in cuts)]
    for o, name in enumerate(head["options"]):
        lines.append(f"{name:>7}  " + "  ".join(f"{1e3 * d[o, c]:>+10.2f} ({n[o, c]:5.2f})" for c in range(len(cuts))))
    return lines


def quant_table(p: Profile) -> list[str]:
    """Measured cost of quantizing one layer's experts of one importance class, per scheme: the KL from the exact
    next-token distribution and the NLL increase per token, and the pairs those experts served per token; then each
    scheme's bytes per expert and mean weight error."""
    q = p.quant_sensitivity
    if q is None:
        return ["quantization sensitivity: not measured (--quant-tokens 0, or an older profile)"]
    head = p.header["quant_sensitivity"]
    per_tok = 1e3 / max(q.predicted, 1)                                               # millinats per token
    lines = [f"quantization sensitivity on {q.tokens} tokens ({head['passes']} passes, {head.get('seconds', 0):g} s): "
             "KL from the exact model (NLL increase) in millinats per token when one layer's experts of one class are "
             "quantized; pairs they served per token",
             f"{'layer':>5}  {'class':<9} " + "  ".join(f"{name:>17}" for name in q.schemes) + "  pairs/token"]
    for l in p.moe_layers:
        for c, name in enumerate(q.classes):
            n = int((q.expert_class[l] == c).sum())
            if n == 0:
                continue
            cells = "  ".join(f"{per_tok * q.kl_sum[l][c, s]:>7.3f} ({per_tok * q.dnll_sum[l][c, s]:+7.3f})"
                              for s in range(len(q.schemes)))
            lines.append(f"{l:>5}  {f'{name} ({n})':<9} {cells}  {q.pairs[l][c, 0] / max(q.positions, 1):>11.2f}")
    err = np.mean([q.weight_error[l] for l in p.moe_layers], axis=(0, 1))                 # [S]
    model = p.header["model"]
    sizes = [f"{name} {b / 1024:.1f} KiB ({b / model['expert_bytes']:.0%}), mean weight error {err[s]:.4f}"
             for s, (name, b) in enumerate(zip(q.schemes, q.expert_bytes))]
    lines.append(f"per expert ({model['expert_bytes'] / 1024:.1f} KiB in {model['checkpoint_dtype']}): "
                 + "; ".join(sizes))
    return lines
