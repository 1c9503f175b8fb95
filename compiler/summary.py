"""The short human summary moe-compile prints: memory split, slots per layer, predictions against the baselines at
the same budget (compiler.predict.BASELINES; hit = exact + understudy; exact, understudy, drop, host and miss add up
to 1; MB/tok: megabytes the link moves per token).
With a precision plan: its precision per importance class and layer, and the best plan held at the checkpoint's
format alone ("native") predicted on the same tokens."""
from __future__ import annotations

from artifacts.plan import Plan
from compiler.memory import MemorySplit
from compiler.predict import BASELINES


def ppl_text(d: dict) -> str:
    """A prediction's perplexity increase, with its 95% interval where the profile gives one: "+0.45% [+0.38, +0.52]"."""
    if d.get("ppl_increase") is None:
        return "-"
    text = f"{100 * d['ppl_increase']:+.2f}%"
    if d.get("ppl_high") is not None:
        text += f" [{100 * d['ppl_low']:+.2f}, {100 * d['ppl_high']:+.2f}]"
    return text


def summarize(plan: Plan) -> str:
    b = plan.budget
    split = MemorySplit(**{k: b[k] for k in MemorySplit.__dataclass_fields__})
    c, p = plan.choices, plan.predicted
    lines = [split.describe(),
             "slots per layer: " + ", ".join(f"{l}:{n}" for l, n in sorted(plan.slots.items()))]
    if plan.precision is not None:
        lines.append(f"precision (high/mid/low importance classes): {c.precision}; slots per layer by precision: "
                     + "; ".join(f"{l}: " + ", ".join(f"{n} {p}" for p, n in d["slots"].items())
                                 for l, d in sorted(plan.precision["layers"].items())))
    lines += [
             f"alpha {c.alpha:g}; understudies: near-twins of error <= tau {c.tau:g}, then the token's "
             f"{c.pool_depth} next router choices; low-score misses without one "
             f"{'dropped' if c.drop_misses else 'loaded'}; prefetch "
             f"{'off' if not c.prefetch else 'up to ' + str(c.prefetch_max or 'k')}, host compute "
             f"{'on' if c.host_compute else 'off'}; objective: {c.objective}",
             f"predicted on {p['target']} ({p['tokens']} trace tokens, batch 1):",
             f"  {'policy':<6} {'hit':>6} {'exact':>6} {'underst.':>8} {'drop':>6} {'host':>6} {'miss':>6} "
             f"{'loads/tok':>10} {'MB/tok':>8} {'TPOT ms':>9} {'ppl':>8}"]
    rows = ("plan",) + (("plan_native",) if "plan_native" in p else ()) + tuple(n for n in BASELINES if n in p)
    for name in rows:                                  # older plans predicted lru and smoe only
        d = p[name]
        ppl = ppl_text(d)
        mb = "-" if "bytes_per_token" not in d else f"{d['bytes_per_token'] / 1e6:.2f}"
        label = "native" if name == "plan_native" else name
        lines.append(f"  {label:<6} {d['hit_rate']:>6.3f} {d.get('exact_hit_rate', 0):>6.3f} "
                     f"{d['substitution_rate']:>8.3f} {d['drop_rate']:>6.3f} {d['host_rate']:>6.3f} "
                     f"{d.get('miss_rate', 0):>6.3f} {d['loads_per_token']:>10.2f} {mb:>8} {d['tpot_ms']:>9.2f} "
                     f"{ppl:>8}")
    if p["plan"].get("ppl_high") is not None:
        lines.append("  ppl: predicted perplexity increase [95% interval of the profile's measurement, a bootstrap "
                     "over its calibration windows]")
    if "oracle" in p:
        lines += ["  lfu: evicts the fewest uses since the load; lfru: the fewest uses per call of age; static: the "
                  "profile's most",
                  "  frequent experts pinned, one streaming slot; oracle: Belady's MIN with bypass on these tokens, "
                  "the lossless bound"]
    pl = p["plan"]
    if "loads_vs_lru" in pl:
        lines.append(f"  plan vs lru: loads x{pl['loads_vs_lru']:.2f}, TPOT x{pl.get('tpot_vs_lru', 0):.2f}; "
                     f"vs smoe: loads x{pl['loads_vs_smoe']:.2f}, TPOT x{pl.get('tpot_vs_smoe', 0):.2f}")
    return "\n".join(lines)
