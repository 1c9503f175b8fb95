"""Sentences built from one run's figures: the document's "What this run shows" and the README's results block.

Every sentence picks its subject and its words by comparing the figures it quotes, as displayed (see figures.py);
none is written in advance, so none can say what the tables do not show.
"""
from __future__ import annotations

import math
import textwrap

from goals import MISSED, OPEN, Check, tally
from figures import (BASELINE, LOSSY, OFFLOADED, PLANS, REFERENCE, Run, join_words, r2, r3, ratio, signed_ci)

MIN_TOKENS = 4096                                  # held-out tokens per policy that accuracy figures rest on


def up(x: float, digits: int) -> float:
    """x rounded up at `digits` decimals: "within up(x)" stays true as displayed."""
    return math.ceil(x * 10**digits - 1e-9) / 10**digits


def ranked(values: dict[str, float], high: bool) -> tuple[list[str], float, list[tuple[str, float]]]:
    """(the policies with the best value, that value, the others best first)."""
    best = max(values.values()) if high else min(values.values())
    winners = [p for p, v in values.items() if v == best]
    rest = sorted(((p, v) for p, v in values.items() if v != best), key=lambda t: -t[1] if high else t[1])
    return winners, best, rest


def lead(values: dict[str, float], high: bool, what: str, fmt: str, unit: str = "") -> str:
    """"`p` had the <what> (v; `q` w, ...)." with the subject chosen by the values."""
    winners, best, rest = ranked(values, high)
    verb = "had" if len(winners) == 1 else "shared"
    others = ", ".join(f"`{p}` {v:{fmt}}{unit}" for p, v in rest)
    return (f"{join_words([f'`{p}`' for p in winners])} {verb} the {what} ({best:{fmt}}{unit}"
            + (f"; {others})." if others else ")."))


def compare(a: float, b: float, more: str, fewer: str, same: str) -> str:
    return more if a > b else fewer if a < b else same


def interval_words(ci: tuple[float, float, float], ref: str) -> str:
    _, lo, hi = ci
    if lo > 0:
        return f"above {ref}'s (the whole interval is above 0)"
    if hi < 0:
        return f"below {ref}'s (the whole interval is below 0)"
    return f"not told apart from {ref}'s (the interval holds 0)"


def cell_sentences(run: Run, r: dict) -> list[str]:
    pol = r["policies"]
    lru = pol[BASELINE]
    out = [lead({p: r3(pol[p]["hit_rate"]) for p in OFFLOADED}, True, "highest hit rate", ".3f"),
           lead({p: r2(pol[p]["loads_per_token"]) for p in OFFLOADED}, False, "fewest loads per token", ".2f"),
           lead({p: r2(ratio(pol[p], lru, "tpot_ms")) for p in OFFLOADED}, False,
                "lowest measured TPOT, as a ratio to lru's", ".2f", "x")]
    modeled = {p: r2(ratio(pol[p], lru, "tpot_ms_modeled")) for p in OFFLOADED
               if ratio(pol[p], lru, "tpot_ms_modeled") is not None}
    if modeled:
        measured_first = ranked({p: r2(ratio(pol[p], lru, "tpot_ms")) for p in OFFLOADED}, False)[0]
        first, best, _ = ranked(modeled, False)
        agree = "as the measurement does" if set(first) == set(measured_first) else (
            f"where the measurement ranks {join_words([f'`{p}`' for p in measured_first])} first")
        out.append(f"The modeled TPOT on the target ranks {join_words([f'`{p}`' for p in first])} first "
                   f"({best:.2f}x lru's), {agree}.")
    out.append("Perplexity vs resident, with 95% intervals: " + "; ".join(
        f"`{p}` {signed_ci(run.ci(r, REFERENCE, p))}, {interval_words(run.ci(r, REFERENCE, p), 'resident')}"
        for p in LOSSY) + ".")
    sm = pol["smoe"]
    parts = []
    for v in PLANS:
        d = pol[v]
        h, sh, ld, sl = r3(d["hit_rate"]), r3(sm["hit_rate"]), r2(d["loads_per_token"]), r2(sm["loads_per_token"])
        parts.append(f"`{v}` had {compare(h, sh, 'more hits than', 'fewer hits than', 'the same hit rate as')} "
                     f"`smoe` ({h:.3f} vs {sh:.3f}) with "
                     f"{compare(ld, sl, 'more loads per token', 'fewer loads per token', 'as many loads per token')}"
                     f" ({ld:.2f} vs {sl:.2f})")
    out.append("; ".join(parts) + ".")
    acc = {p: d["task_accuracy"] for p, d in pol.items() if d.get("task_accuracy") is not None}
    if acc and r.get("tasks"):
        lo, hi = min(acc.values()), max(acc.values())
        n = r["tasks"]["count"]
        out.append(f"Every policy answered the same share of the {n} tasks ({lo:.2f})." if r2(lo) == r2(hi) else
                   f"Task accuracy on {n} tasks ranged from {lo:.2f} (" + join_words(
                       [f"`{p}`" for p, a in acc.items() if a == lo]) + f") to {hi:.2f} (" + join_words(
                       [f"`{p}`" for p, a in acc.items() if a == hi]) + ").")
    return out


def prediction_sentence(run: Run, model: str) -> str | None:
    """How far the compiler's predictions (calibration trace) fell from the measured figures (held-out text)."""
    gaps_h, gaps_l = [], []
    for _, batch, r in run.cells(model):
        for v in PLANS:
            p = r.get("predicted", {}).get(v)
            if batch == 1 and p:
                gaps_h.append(abs(p["plan"]["hit_rate"] - r["policies"][v]["hit_rate"]))
                gaps_l.append(abs(p["plan"]["loads_per_token"] - r["policies"][v]["loads_per_token"]))
    if not gaps_h:
        return None
    return (f"At batch 1, the compiler's predicted hit rates for both plans (replayed on the calibration trace) were "
            f"within {up(max(gaps_h), 3):.3f} of the measured ones on the held-out text, and its predicted loads per "
            f"token within {up(max(gaps_l), 2):.2f}.")


def peer_sentence(model: str, pe: dict) -> str | None:
    hf, ours = pe.get("hf_generate_resident", {}), pe.get("understudy_resident", {})
    off, plan = pe.get("hf_accelerate_offload_50", {}), pe.get("understudy_plan_50") or {}
    parts = []
    if hf.get("ok") and ours.get("tpot_ms"):
        parts.append(f"the runtime's resident TPOT was {ours['tpot_ms'] / hf['tpot_ms']:.2f}x HF generate's")
    if off.get("ok") and plan.get("tpot_ms"):
        x = off["tpot_ms"] / plan["tpot_ms"]
        parts.append(f"HF + accelerate offloading at 50% took {off['tpot_ms']:.1f} ms per token, {x:.2f}x the "
                     f"runtime's plan at 50% ({plan['tpot_ms']:.1f} ms)")
    elif off and not off.get("ok", True):
        parts.append(f"HF + accelerate offloading could not run ({off['error']})")
    return f"Peers on `{model}`: " + "; ".join(parts) + "." if parts else None


def tokens_sentence(run: Run, model: str) -> str:
    cells = run.cells(model)
    tokens = sorted({r["tokens"] for _, _, r in cells})
    r0 = cells[0][2]
    s = (f"Every cell of `{model}` measures each policy on {join_words([str(t) for t in tokens])} held-out tokens "
         f"({r0['windows']} windows of {r0['window']}).")
    if min(tokens) < MIN_TOKENS:
        s += (f" That is fewer than the {MIN_TOKENS} the accuracy figures are meant to rest on (the run's --max-tokens "
              "and --tokens-for).")
    return s


def shows_section(run: Run) -> list[str]:
    out = ["## What this run shows", "",
           "Every sentence here is built by `benchmarks/findings.py` from the figures in the tables above.", ""]
    for model in run.models():
        out += [f"### {model}", "", tokens_sentence(run, model), ""]
        for pct, batch, r in run.cells(model):
            out.append(f"- {pct} cache, batch {batch}: " + " ".join(cell_sentences(run, r)))
        out.append("")
        extra = [s for s in (prediction_sentence(run, model), peer_sentence(model, run.peers.get(model, {}))) if s]
        if extra:
            out += [" ".join(extra), ""]
    return out


def readme_block(run: Run, checks: list[Check], doc: str) -> list[str]:
    """The README's results paragraph, wrapped at 118: a sentence per model at batch 1, the goals' tally, a pointer."""
    out = []
    for model in run.models():
        cells = [(pct, r) for pct, batch, r in run.cells(model) if batch == 1]
        if not cells:
            continue
        pcts = " / ".join(pct.rstrip("%") for pct, _ in cells) + "%"

        def each(key: str) -> str:
            return " / ".join(f"{ratio(r['policies']['plan'], r['policies'][BASELINE], key):.2f}" for _, r in cells)

        ppl = "; ".join(f"{pct}: {signed_ci(run.ci(r, REFERENCE, 'plan'))}" for pct, r in cells)
        tokens = join_words(sorted({str(r["tokens"]) for _, r in cells}))
        out.append(f"`{model}`, batch 1, {tokens} held-out tokens per policy: at {pcts} cache the default plan made "
                   f"{each('loads_per_token')}x the loads of `lru` with {each('tpot_ms')}x its measured TPOT; its "
                   f"perplexity change vs resident was {ppl} (95% intervals).")
    if checks:
        line = f"Goals checked in the document ({tally(checks)})"
        for verdict in (MISSED, OPEN):
            names = [c.name for c in checks if c.verdict == verdict]
            if names:
                line += f"; {verdict}, by goal: " + ", ".join(f"{n} ({names.count(n)})" for n in dict.fromkeys(names))
        out.append(line + ".")
    meta = run.meta
    out.append(f"Tables, intervals, plots, peers and each goal's check: [{doc}]({doc}), written by "
               f"`{meta.get('command', 'python benchmarks/run_benchmarks.py')}` in {meta.get('wall_s', 0) / 60:.0f} "
               f"minutes on {meta.get('machine', {}).get('summary', 'this machine')}.")
    return [textwrap.fill(p, 118, break_long_words=False, break_on_hyphens=False) for p in out]
