"""report.md and its plots for a plan: hit rate and modeled TPOT against budget for lru, smoe, plan (the plan's
choices, slots re-allocated per budget from the profiled gain curves) and the oracle (Belady's bound on lossless
caching), and similarity heatmaps with clusters."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from artifacts.plan import Plan
from artifacts.profile import Profile
from compiler.allocate import allocate_slots
from compiler.loss_model import LossModel
from compiler.predict import simulate_baseline, simulate_plan
from compiler.simulator import Costs
from compiler.summary import ppl_text, summarize
from compiler.targets import Target

BUDGETS = (0.125, 0.25, 0.5, 0.75)
SWEPT = ("lru", "smoe", "plan", "oracle")     # oracle: the lossless bound (the others are in the summary's table)


def _figure(w=6.4, h=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def budget_sweep(plan: Plan, profile: Profile) -> list[dict]:
    """Rows {budget, policy, this_plan, prediction} at BUDGETS and at the plan's own budget. Each budget's plan
    re-allocates slots from the profiled gain curves and keeps the plan's choices (compiler.predict, the compiler's
    own replay); the plan's own row is plan.json's prediction itself."""
    model = profile.header["model"]
    costs = Costs.of(Target.from_dict(plan.header["target"]), model)
    layers, e = profile.moe_layers, profile.num_experts
    curves = {int(l): c for l, c in plan.header["curves"].items()}
    choices, subs_map = plan.choices, plan.substitution_map()
    tokens = int(plan.predicted["tokens"])
    loss_model = LossModel.from_profile(profile)
    total_experts = e * len(layers)
    own = sum(plan.slots.values())
    rows = []
    for total in sorted({max(len(layers), int(frac * total_experts)) for frac in BUDGETS} | {own}):
        for name in SWEPT:
            if total == own:
                r = plan.predicted[name]
            elif name == "plan":
                slots = allocate_slots(curves, total, e)
                r = simulate_plan(profile, slots, choices, subs_map, costs, tokens, loss_model).to_dict()
            else:
                r = simulate_baseline(profile, name, total, choices.window, choices.host_compute, costs, tokens,
                                      loss_model).to_dict()
            rows.append({"budget": total / total_experts, "slots": total, "policy": name, "this_plan": total == own,
                         **r})
    return rows


def _precision_text(plan: Plan, profile: Profile) -> str:
    """Per layer: the precision of every expert (by importance class), the slots per precision, and the profile's
    measured cost of each class at each scheme (KL per token, the compiler's loss model)."""
    p, q = plan.precision, profile.quant_sensitivity
    if p is None:
        why = ("the profile did not measure quantization (moe-profile --quant-tokens 0)" if q is None else
               "no precision option beat the checkpoint's format under the objective, or --precision off")
        return f"Every expert is held at the checkpoint's format ({plan.expert_dtype}): {why}."
    nbytes = plan.precision_bytes()
    lines = [f"Precision per importance class (high/mid/low, by I_e rank per layer): `{plan.choices.precision}`; "
             "bytes per expert: " + ", ".join(f"{n} {b / 1024:.1f} KiB" for n, b in nbytes.items()) + ". "
             "The runtime makes the quantized copies when it starts (runtime.pooled_store); `--lossless` runs "
             "every expert at the checkpoint's format in the slots the same bytes hold.", "",
             "| layer | slots by precision | experts by precision | measured KL per token, " +
             ", ".join(f"{c} class" for c in q.classes) + " (" + " / ".join(q.schemes) + ", millinats) |",
             "|---|---|---|---|"]
    for l in sorted(p["layers"]):
        d = p["layers"][l]
        by = {}
        for e, n in enumerate(d["experts"]):
            by.setdefault(n, []).append(e)
        kl = q.kl_sum[l] / max(q.predicted, 1) * 1e3                      # [C, S] millinats per token
        cost = "; ".join(" / ".join(f"{v:.3f}" for v in kl[c]) for c in range(len(q.classes)))
        lines.append(f"| {l} | {', '.join(f'{n} {k}' for k, n in d['slots'].items())} | "
                     + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in by.items()) + f" | {cost} |")
    return "\n".join(lines)


def _cluster_text(plan: Plan) -> str:
    """Per layer: the clusters of more than one expert, their measured within-cluster error, and the near-twin
    pairs the plan may use (same cluster, error <= tau)."""
    lines = ["Near-twin understudies come only from an expert's own cluster, with a profiled relative output error "
             f"<= tau = {plan.tau:g}; experts in singleton clusters have none.", "",
             "| layer | clusters | multi-expert clusters (members: mean / max error) | near-twin pairs within tau |",
             "|---|---|---|---|"]
    for l in sorted(plan.slots):
        table = plan.cluster_table.get(l, [])
        multi = [f"{{{', '.join(map(str, c['members']))}}}: {c['mean_error']:.2f} / {c['max_error']:.2f}"
                 for c in table if len(c["members"]) > 1]
        within = sum(1 for v in plan.substitutes.get(l, {}).values() for _, _, err in v if err <= plan.tau)
        lines.append(f"| {l} | {len(table)} | {'; '.join(multi) or 'none'} | {within} |")
    return "\n".join(lines)


def write_report(plan: Plan, profile_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    profile = Profile.load(profile_dir)
    sweep = budget_sweep(plan, profile)
    fig = _figure(9, 3.6)
    for n, (key, label) in enumerate((("hit_rate", "hit rate"), ("tpot_ms", "modeled TPOT (ms)"))):
        ax = fig.add_subplot(1, 2, n + 1)
        for name, style in (("lru", "o-"), ("smoe", "s-"), ("plan", "^-"), ("oracle", "k:")):
            pts = [r for r in sweep if r["policy"] == name]
            ax.plot([100 * r["budget"] for r in pts], [r[key] for r in pts], style, label=name)
        ax.set_xlabel("cache budget (% of routed-expert bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"trace replay on {plan.predicted.get('target')}")
    fig.tight_layout()
    fig.savefig(out / "budget_sweep.png")

    shown = profile.moe_layers[:4]
    fig = _figure(3.4 * len(shown), 3.6)
    for n, l in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), n + 1)
        labels = profile.clusters[l]
        order = np.argsort(labels, kind="stable")
        sim = profile.similarity[l][np.ix_(order, order)]
        im = ax.imshow(sim, vmin=-0.2, vmax=1.0, cmap="viridis")
        ticks = [f"{e}" for e in order]                    # expert ids, grouped by cluster
        ax.set_xticks(range(len(order)), ticks, fontsize=5, rotation=90)
        ax.set_yticks(range(len(order)), [f"c{labels[e]}:{e}" for e in order], fontsize=5)
        edges = [i for i in range(1, len(order)) if labels[order[i]] != labels[order[i - 1]]]
        for b in edges:                                     # cluster boundaries
            ax.axhline(b - 0.5, color="white", lw=0.6)
            ax.axvline(b - 0.5, color="white", lw=0.6)
        twins = sum(len(v) for v in plan.substitutes.get(l, {}).values())
        ax.set_title(f"layer {l}: {len(set(labels.tolist()))} clusters, {twins} near-twin pairs", fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="mean output cosine")
    fig.savefig(out / "similarity.png")

    rows = ["| budget | policy | exact hit | understudy | drop | host | miss | loads/token | modeled TPOT (ms) | "
            "predicted ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sweep:
        ppl = ppl_text(r)
        mark = " (this plan)" if r["this_plan"] else ""
        rows.append(f"| {100 * r['budget']:.1f}% ({r['slots']} slots){mark} | {r['policy']} | "
                    f"{r['exact_hit_rate']:.3f} | {r['substitution_rate']:.3f} | {r['drop_rate']:.3f} | "
                    f"{r['host_rate']:.3f} | {r['miss_rate']:.3f} | {r['loads_per_token']:.2f} | {r['tpot_ms']:.2f} | "
                    f"{ppl} |")
    text = (f"# Plan report\n\nModel `{plan.header['model']['model_type']}` (fingerprint "
            f"`{plan.fingerprint}`), target `{plan.predicted.get('target')}`.\n\n```\n{summarize(plan)}\n```\n\n"
            f"## Budget sweep\n\nTrace replay ({plan.predicted['tokens']} calibration tokens) through the runtime's own "
            "cache model; at each budget the plan keeps its choices and re-allocates its slots; the row marked "
            "(this plan) is plan.json's prediction; oracle is Belady's MIN with bypass on the same tokens, the "
            "fewest loads of any lossless policy that computes every expert on the device (lfu, lfru and static are "
            "in the table above, at the plan's budget). Each row's exact hit, understudy, drop, host and miss shares "
            "add up to 1.\n\n"
            + ("At the other budgets the sweep's plan holds every expert at the checkpoint's format (moe-compile "
               "chooses the precision per budget).\n\n" if plan.precision is not None else "") +
            "![budget sweep](budget_sweep.png)\n\n" + "\n".join(rows) +
            "\n\n## Precision map\n\n" + _precision_text(plan, profile) +
            "\n\n## Functional clusters (experts ordered by cluster; row labels cCLUSTER:EXPERT)\n\n"
            "![similarity](similarity.png)\n\n" + _cluster_text(plan) + "\n")
    (out / "report.md").write_text(text)
    return out / "report.md"
