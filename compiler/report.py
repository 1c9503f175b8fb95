"""report.md and its plots for a plan: hit rate and modeled TPOT against budget for lru, smoe and plan (the plan's
choices, slots re-allocated per budget from the profiled gain curves), and similarity heatmaps with clusters."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from artifacts.plan import Plan
from artifacts.profile import Profile
from compiler.allocate import allocate_slots
from compiler.simulator import Costs, simulate
from compiler.summary import summarize
from compiler.targets import Target
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.policy.slots import uniform_slots

BUDGETS = (0.125, 0.25, 0.5, 0.75)


def _figure(w=6.4, h=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def budget_sweep(plan: Plan, profile: Profile, tokens: int = 1024) -> dict[str, list[dict]]:
    model = profile.header["model"]
    target = Target.from_dict(plan.header["target"])
    costs = Costs.of(target, model)
    layers, e, k = profile.moe_layers, profile.num_experts, profile.top_k
    curves = {int(l): c for l, c in plan.header["curves"].items()}
    c = plan.choices
    subs_map = plan.substitution_map()
    out: dict[str, list[dict]] = {"lru": [], "smoe": [], "plan": []}
    for frac in BUDGETS:
        total = max(len(layers), int(frac * e * len(layers)))
        uni = uniform_slots(total, layers, e)
        for name in ("lru", "smoe"):
            pol = preset(name, window=c["window"], host_compute=c["host_compute"] if name == "smoe" else False)
            r = simulate(profile.trace, layers, e, k, uni, pol, substitution_params(pol, layers), costs,
                         error=profile.substitution_error, tokens=tokens)
            out[name].append({"budget": frac, **r.to_dict()})
        pol = preset("plan", alpha=c["alpha"], window=c["window"], prefetch=c["prefetch"],
                     prefetch_max=c["prefetch_max"], host_compute=c["host_compute"])
        slots = allocate_slots(curves, total, e)
        r = simulate(profile.trace, layers, e, k, slots, pol, substitution_params(pol, layers, subs_map, c["tau"]),
                     costs, error=profile.substitution_error, tokens=tokens)
        out["plan"].append({"budget": frac, **r.to_dict()})
    return out


def write_report(plan: Plan, profile_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    profile = Profile.load(profile_dir)
    sweep = budget_sweep(plan, profile)
    fig = _figure(9, 3.6)
    for n, (key, label) in enumerate((("hit_rate", "hit rate"), ("tpot_ms", "modeled TPOT (ms)"))):
        ax = fig.add_subplot(1, 2, n + 1)
        for name, style in (("lru", "o-"), ("smoe", "s-"), ("plan", "^-")):
            ax.plot([100 * r["budget"] for r in sweep[name]], [r[key] for r in sweep[name]], style, label=name)
        ax.set_xlabel("cache budget (% of routed-expert bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"trace replay on {plan.predicted.get('target')}")
    fig.tight_layout()
    fig.savefig(out / "budget_sweep.png")

    shown = profile.moe_layers[:4]
    fig = _figure(3.2 * len(shown), 3.2)
    for n, l in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), n + 1)
        order = np.argsort(profile.clusters[l], kind="stable")
        sim = profile.similarity[l][np.ix_(order, order)]
        im = ax.imshow(sim, vmin=-0.2, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {l}: {len(set(profile.clusters[l].tolist()))} clusters", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="mean output cosine")
    fig.savefig(out / "similarity.png")

    rows = ["| budget | policy | hit rate | loads/token | modeled TPOT (ms) | relative error |", "|---|---|---|---|---|---|"]
    for i, frac in enumerate(BUDGETS):
        for name in ("lru", "smoe", "plan"):
            r = sweep[name][i]
            rows.append(f"| {100 * frac:g}% | {name} | {r['hit_rate']:.3f} | {r['loads_per_token']:.2f} | "
                        f"{r['tpot_ms']:.2f} | {r['relative_error']:.4f} |")
    text = (f"# Plan report\n\nModel `{plan.header['model']['model_type']}` (fingerprint "
            f"`{plan.fingerprint}`), target `{plan.predicted.get('target')}`.\n\n```\n{summarize(plan)}\n```\n\n"
            "## Budget sweep (trace replay through the runtime's cache model; the plan's choices, its slots "
            "re-allocated per budget)\n\n![budget sweep](budget_sweep.png)\n\n" + "\n".join(rows) +
            "\n\n## Functional similarity (experts ordered by cluster)\n\n![similarity](similarity.png)\n")
    (out / "report.md").write_text(text)
    return out / "report.md"
