"""The issues' goals, each checked by code against one run's figures; the verdict is a computed word.

Perplexity goals rest on the paired bootstrap interval (evaluation.stats.paired_bootstrap, 95%) of the change:
    goal "change <= L":  met when hi <= L, missed when lo > L, otherwise not resolved (the interval holds L).
Hit rate, loads, agreement and TPOT have no interval in a moe-eval result; they are compared as displayed (rates to
3 decimals, ratios to 2), on the one measurement of the run.
"""
from __future__ import annotations

from dataclasses import dataclass

from figures import BASELINE, PLANS, REFERENCE, Run, r2, r3, ratio, signed_ci

MET, MISSED, OPEN, NOT_CHECKED = "met", "missed", "not resolved", "not checked"
VERDICTS = (MET, MISSED, OPEN, NOT_CHECKED)
GOAL_MODEL = "tiny-qwen2moe"
UPCYCLED = "tiny-qwen2moe-upcycled"
# per budget on GOAL_MODEL, batch 1, for both plans: hit rate >=, loads <= x lru, TPOT <= x lru, ppl change <= %,
# agreement >=
PLAN_GOALS = {"50%": {"hit": 0.85, "loads": 0.55, "tpot": 0.6, "ppl": 0.5, "agree": 0.95},
              "25%": {"hit": 0.70, "loads": 0.6, "ppl": 1.5}}
HF_RATIO = 1.1                                     # resident TPOT <= 1.1x HF generate's
BUDGETS = ("12.5%", "25%", "50%")


@dataclass(frozen=True)
class Check:
    group: str          # the list it is shown in
    model: str
    scope: str          # "50% cache, `plan`"
    name: str           # what the goal is about, short: "hit rate"
    figure: str         # what was measured, as shown
    goal: str           # "<= 0.55x lru"
    verdict: str        # one of VERDICTS


def point(ok: bool) -> str:
    return MET if ok else MISSED


def within(ci: tuple[float, float, float], limit: float) -> str:
    """Verdict of the goal "perplexity change <= limit (percent)" from (delta, lo, hi)."""
    _, lo, hi = ci
    return MET if hi <= limit else MISSED if lo > limit else OPEN


def plan_goals(run: Run) -> list[Check]:
    group = f"Plans on `{GOAL_MODEL}`, batch 1"
    out = []
    for pct, g in PLAN_GOALS.items():
        r = run.cell(GOAL_MODEL, pct)
        if r is None:
            continue
        pol = r["policies"]
        lru = pol[BASELINE]
        for v in PLANS:
            d = pol[v]
            loads = r2(ratio(d, lru, "loads_per_token"))
            parts = [("hit rate", f"hit rate {r3(d['hit_rate']):.3f}", f">= {g['hit']:.2f}",
                      point(r3(d["hit_rate"]) >= g["hit"])),
                     ("loads", f"loads/token {loads:.2f}x lru", f"<= {g['loads']}x", point(loads <= g["loads"]))]
            if "tpot" in g:
                tpot, modeled = r2(ratio(d, lru, "tpot_ms")), ratio(d, lru, "tpot_ms_modeled")
                m = "" if modeled is None else f", modeled {modeled:.2f}x"
                parts.append(("measured TPOT", f"measured TPOT {tpot:.2f}x lru{m}", f"<= {g['tpot']}x",
                              point(tpot <= g["tpot"])))
            ci = run.ci(r, REFERENCE, v)
            parts.append(("perplexity", f"perplexity {signed_ci(ci)} vs resident", f"<= +{g['ppl']}%",
                          within(ci, g["ppl"])))
            if "agree" in g:
                for kind in ("top1", "greedy"):
                    a = d.get(f"{kind}_agreement")
                    if a is not None:
                        what = f"{kind.replace('top1', 'top-1')} agreement"
                        parts.append((what, f"{what} {r3(a):.3f}", f">= {g['agree']}", point(r3(a) >= g["agree"])))
            out += [Check(group, GOAL_MODEL, f"{pct} cache, `{v}`", *p) for p in parts]
    return out


def beats(d: dict, others: list[dict]) -> bool:
    """More hits and fewer loads per token than every one of `others` (as displayed)."""
    return (r3(d["hit_rate"]) > max(r3(o["hit_rate"]) for o in others)
            and r2(d["loads_per_token"]) < min(r2(o["loads_per_token"]) for o in others))


def hits_and_loads_goals(run: Run) -> list[Check]:
    group = f"More hits and fewer loads than both lru and smoe, `{GOAL_MODEL}`, batch 1"
    out = []
    for pct in BUDGETS:
        r = run.cell(GOAL_MODEL, pct)
        if r is None:
            continue
        pol, pred = r["policies"], r.get("predicted", {})
        for v in PLANS:
            d, lru, sm = pol[v], pol["lru"], pol["smoe"]
            scope = f"{pct}, `{v}`"
            out.append(Check(group, GOAL_MODEL, scope, "measured hits and loads",
                             f"measured hit rate {r3(d['hit_rate']):.3f} vs {r3(lru['hit_rate']):.3f} / "
                             f"{r3(sm['hit_rate']):.3f}, loads/token {r2(d['loads_per_token']):.2f} vs "
                             f"{r2(lru['loads_per_token']):.2f} / {r2(sm['loads_per_token']):.2f}",
                             "hits above both, loads below both", point(beats(d, [lru, sm]))))
            p = pred.get(v)
            if p:
                pp, pl, ps = p["plan"], p["lru"], p["smoe"]
                out.append(Check(group, GOAL_MODEL, scope, "predicted hits and loads",
                                 f"predicted on the calibration trace {r3(pp['hit_rate']):.3f} vs "
                                 f"{r3(pl['hit_rate']):.3f} / {r3(ps['hit_rate']):.3f}, {r2(pp['loads_per_token']):.2f}"
                                 f" vs {r2(pl['loads_per_token']):.2f} / {r2(ps['loads_per_token']):.2f}",
                                 "hits above both, loads below both", point(beats(pp, [pl, ps]))))
    return out


def upcycled_goals(run: Run) -> list[Check]:
    group = f"`{UPCYCLED}`: a plan's hit rate at least smoe's, at a perplexity no higher than smoe's, batch 1"
    out = []
    for pct in BUDGETS:
        r = run.cell(UPCYCLED, pct)
        if r is None:
            continue
        pol = r["policies"]
        sm = pol["smoe"]
        for v in PLANS:
            d = pol[v]
            ci = run.ci(r, "smoe", v)
            hits_ok = r3(d["hit_rate"]) >= r3(sm["hit_rate"])
            verdict = MISSED if not hits_ok else within(ci, 0.0)
            u = d.get("understudies", {})
            out.append(Check(group, UPCYCLED, f"{pct}, `{v}`", "hits and perplexity vs smoe",
                             f"hit rate {r3(d['hit_rate']):.3f} vs smoe {r3(sm['hit_rate']):.3f}, perplexity "
                             f"{signed_ci(ci)} vs smoe (understudies: {u.get('band', 0)} band, "
                             f"{u.get('similarity', 0)} near-twin; dropped {r3(d['drop_rate']):.3f} of pairs)",
                             "hit rate >= smoe's, perplexity change <= 0", verdict))
    return out


def peer_goals(run: Run) -> list[Check]:
    group = f"The runtime's own overhead: resident TPOT <= {HF_RATIO}x HF generate's"
    out = []
    for name, pe in run.peers.items():
        hf, ours = pe.get("hf_generate_resident", {}), pe.get("understudy_resident", {})
        if hf.get("ok") and ours.get("tpot_ms"):
            x = r2(ours["tpot_ms"] / hf["tpot_ms"])
            figure, verdict = f"resident TPOT {x:.2f}x HF generate", point(x <= HF_RATIO)
        else:
            figure, verdict = f"HF generate could not run ({hf.get('error', 'no figure')})", NOT_CHECKED
        out.append(Check(group, name, name, "resident TPOT vs HF generate", figure, f"<= {HF_RATIO}x", verdict))
    return out


def all_goals(run: Run) -> list[Check]:
    return plan_goals(run) + hits_and_loads_goals(run) + upcycled_goals(run) + peer_goals(run)


def tally(checks: list[Check]) -> str:
    """"N checks: a met, b missed, c not resolved" (verdicts with no check left out)."""
    counts = [(v, sum(c.verdict == v for c in checks)) for v in VERDICTS]
    return f"{len(checks)} checks: " + ", ".join(f"{n} {v}" for v, n in counts if n)


def goals_section(run: Run, checks: list[Check]) -> list[str]:
    out = ["## Goals", "",
           "Each verdict below is computed by `benchmarks/goals.py` from this run's figures. A perplexity goal is met "
           "when the upper bound of the 95% paired-bootstrap interval of the change is at or below the limit, missed "
           "when the lower bound is above it, and not resolved when the interval holds the limit. Hit rate, loads, "
           "agreement and TPOT are one measurement each (no interval), compared as displayed.", ""]
    if not checks:
        return out + ["No cell of this run is one a goal is stated for.", ""]
    out += [f"{tally(checks)}.", ""]
    groups: dict[str, dict[str, list[Check]]] = {}
    for c in checks:
        groups.setdefault(c.group, {}).setdefault(c.scope, []).append(c)
    for group, scopes in groups.items():
        out += [f"{group}:", ""]
        for scope, cs in scopes.items():
            out.append(f"- {scope}: " + "; ".join(f"{c.figure} (goal {c.goal}: {c.verdict})" for c in cs) + ".")
        out.append("")
    return out
