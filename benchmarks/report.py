"""docs/BENCHMARKS.md, its plots and the README's results block, written from one run's figures (a `Run`).

The sections other scripts own (benchmarks/sections.py: benchmarks/memory.py's memory section, eval_time.py's) are
carried over byte for byte, at the end; the README is rewritten only between its results markers.
"""
from __future__ import annotations

from pathlib import Path

from emulated_link import TARGET, target_ratio
from figures import BASELINE, OFFLOADED, REFERENCE, Run, r2, r3, ratio, shares, signed_ci, HITS_MAX_ERROR
from findings import readme_block, shows_section
from goals import all_goals, goals_section
from sections import kept_sections

RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"
PLOT_STYLES = (("lru", "o-"), ("smoe", "s-"), ("plan", "^-"), ("plan-hits", "v--"))


def header(run: Run) -> list[str]:
    m, c = run.meta, run.meta.get("config", {})
    mach = m.get("machine", {})
    lines = ["# Benchmarks", "",
             f"Written by `{m.get('command')}` in {m.get('wall_s', 0):.0f} s ({m.get('wall_s', 0) / 60:.1f} min) on "
             f"{mach.get('summary')}, torch {mach.get('torch')}, {c.get('threads', 1)} compute thread (the other "
             f"core runs the loader), device `{c.get('device', 'cpu')}`; started {m.get('started')}"
             + (f" at commit {m['commit']}." if m.get("commit") else ".")]
    if m.get("regenerated"):
        lines[-1] += f" Regenerated without rerunning by `{m['regenerated']}`."
    if m.get("peers_note"):
        lines[-1] += f" {m['peers_note']}"
    lines += ["", "Every time below is measured on this machine with an emulated link calibrated so that one expert "
              f"load costs {target_ratio():.2f} layers of compute, as on {TARGET['name']} "
              "(benchmarks/emulated_link.py); `modeled` is the plan's trace replay on the dev-emulated target. Each "
              "cell is one `evaluation.run_eval.evaluate` (moe-eval) run of every policy over the same held-out tokens, "
              f"teacher-forced one step at a time in windows of {c.get('window')} (batch B: B windows side by side), "
              f"up to {c.get('max_tasks')} cloze tasks from held-out texts, and {c.get('prompts')} greedy "
              "continuations of 16 tokens compared with resident's (greedy agreement: the share reproduced before "
              "the first difference; top-1 agreement: teacher-forced argmax agreement at every position). Perplexity "
              "changes carry a 95% paired-bootstrap interval over the windows (evaluation.stats.paired_bootstrap). "
              "Ratios are to lru in the same cell. Two plans per budget: `plan` is moe-compile's default (the least "
              "modeled TPOT whose predicted perplexity increase is at most +0.5%), `plan-hits` is "
              f"`--max-error {HITS_MAX_ERROR}` (the most hits within a predicted +{100 * HITS_MAX_ERROR:.1f}%). "
              "Shares of (token, expert) pairs: exact hit + understudy = hit rate; + drop + host + miss = 1.", ""]
    for name, link in run.links.items():
        lines.append(f"- {name}: emulated link {link['link']} (one layer computes in {link['t_layer_ms']:.2f} ms here)")
    return lines + [""]


def num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def model_table(run: Run, model: str) -> list[str]:
    cols = ["budget", "batch", "policy", "ppl", "ppl vs resident, % [95% CI]", "top-1 agr", "greedy agr", "task acc",
            "hit rate", "exact hit", "understudy", "drop", "host", "miss", "loads/token", "loads vs lru", "TPOT ms",
            "TPOT vs lru", "modeled TPOT ms", "modeled vs lru"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for pct, batch, r in run.cells(model):
        pol = r["policies"]
        lru = pol[BASELINE]
        for p in (REFERENCE, *OFFLOADED):
            d = pol.get(p)
            if d is None:
                continue
            s = shares(d)
            vs = "-" if p == REFERENCE else signed_ci(run.ci(r, REFERENCE, p))
            lines.append("| " + " | ".join([
                pct, str(batch), p, f"{d['perplexity']:.3f}", vs, f"{r3(d['top1_agreement']):.3f}",
                num(d.get("greedy_agreement"), ".3f"), num(d.get("task_accuracy"), ".2f"), f"{r3(d['hit_rate']):.3f}",
                *(f"{r3(s[k]):.3f}" for k in ("exact", "understudy", "drop", "host", "miss")),
                f"{r2(d['loads_per_token']):.2f}", num(ratio(d, lru, "loads_per_token"), ".2f"), f"{d['tpot_ms']:.1f}",
                num(ratio(d, lru, "tpot_ms"), ".2f"), num(d.get("tpot_ms_modeled"), ".1f"),
                num(ratio(d, lru, "tpot_ms_modeled"), ".2f")]) + " |")
    return lines + [""]


def plot(run: Run, model: str, path: Path) -> bool:
    """Hit rate, loads/token and the perplexity change vs resident (with its interval) against the budget, batch 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [(float(pct.rstrip("%")), r) for pct, batch, r in run.cells(model) if batch == 1]
    if not cells:
        return False
    fig = Figure(figsize=(10, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for n, (key, label) in enumerate((("hit_rate", "hit rate"), ("loads_per_token", "loads/token"),
                                      ("ppl", "perplexity vs resident, % (95% CI)"))):
        ax = fig.add_subplot(1, 3, n + 1)
        for i, (p, style) in enumerate(PLOT_STYLES):
            xs = [x for x, _ in cells]
            if key == "ppl":                       # intervals side by side: each policy shifted by a few percent
                cis = [run.ci(r, REFERENCE, p) for _, r in cells]
                err = [[d - lo for d, lo, _ in cis], [hi - d for d, _, hi in cis]]
                ax.errorbar([x * (1 + 0.04 * (i - 1.5)) for x in xs], [d for d, _, _ in cis], yerr=err, fmt=style,
                            capsize=3, label=p)
            else:
                ax.plot(xs, [r["policies"][p][key] for _, r in cells], style, label=p)
        ax.set_xscale("log")
        ax.set_xticks([x for x, _ in cells], [f"{x:g}" for x, _ in cells])
        ax.minorticks_off()
        ax.set_xlabel("cache (% of routed-expert bytes)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def peers_table(run: Run) -> list[str]:
    cols = (("hf_generate_resident", "HF generate, resident"), ("understudy_resident", "runtime, resident"),
            ("hf_accelerate_offload_50", "HF + accelerate disk offload, 50%"),
            ("understudy_plan_50", "runtime, plan 50%"))
    lines = ["## Peers", "",
             "Greedy generation of 24 tokens from 3 prompts, float32, median time per token after the first (ms), "
             "without the emulated link: HF + accelerate reads the experts beyond its memory budget from its offload "
             "folder (page cache), the runtime's plan from the mmap'd checkpoint.", "",
             "| model | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, pe in run.peers.items():
        cells = []
        for k, _ in cols:
            v = pe.get(k) or {}
            cells.append(f"{v['tpot_ms']:.1f}" if v.get("tpot_ms") is not None else
                         f"could not run ({v['error']})" if v.get("error") else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def sensitivity_section(run: Run) -> list[str]:
    if not run.profiles:
        return []
    out = ["## What a substitution costs (measured by moe-profile)", "",
           "Each profile replaces every low-score pair (s_i <= cut x S(k+1)) of every MoE layer by one option, on "
           "its sensitivity tokens of calibration text, and measures the next-token loss: `drop` leaves the expert "
           "out, `next d` gives its weight to the token's d-th best inactive expert. The compiler charges every "
           "understudy and drop of a replayed trace with these costs (its predicted perplexity increase).", ""]
    for name, p in run.profiles.items():
        out += [f"{name} (median output error of one expert standing in for another: {p['median_error']:.2f}; "
                "1 = a zero output):", "", "```", *p["sensitivity"], "```", ""]
    return out


def owned_sections(*docs: Path) -> list[str]:
    """The script-owned sections of the first of `docs` that has any."""
    for doc in docs:
        kept = kept_sections(doc.read_text()) if doc.is_file() else []
        if kept:
            return kept
    return []


def write_doc(run: Run, out: Path, sections_from: Path) -> list:
    """Write the document and its plots (next to it, in benchmarks/); returns the goal checks. The script-owned
    sections come from `out` as it was, or else from `sections_from`."""
    owned = owned_sections(out, sections_from)    # read before `out` is overwritten
    plots = out.parent / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    lines = header(run)
    for model in run.models():
        lines += [f"## {model}", "", *model_table(run, model)]
        if plot(run, model, plots / f"{model}.png"):
            lines += [f"![{model}](benchmarks/{model}.png)", ""]
    if run.peers:
        lines += peers_table(run)
    lines += sensitivity_section(run)
    checks = all_goals(run)
    lines += goals_section(run, checks)
    lines += shows_section(run)
    for section in owned:
        lines += [section, ""]
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
    return checks


def write_readme(run: Run, checks: list, readme: Path, doc: str) -> None:
    text = readme.read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise SystemExit(f"{readme} has no {RESULTS_BEGIN} ... {RESULTS_END} block; add both markers under "
                         "'## Results so far' (or pass --readme -) and run again with --from-json")
    head, rest = text.split(RESULTS_BEGIN, 1)
    block = "\n\n".join(readme_block(run, checks, doc))
    readme.write_text(f"{head}{RESULTS_BEGIN}\n{block}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}")
