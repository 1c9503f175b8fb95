"""Regenerate docs/BENCHMARKS.md and its plots from scratch: accuracy and speed per policy and budget, with peers.

    python benchmarks/run_benchmarks.py            # about 50 minutes on a 2-core CPU

For each model (the embedded demo model and the shared tiny-qwen2moe fixtures): profile on calibration text, compile
two plans per budget (`plan`: the default objective, the least modeled TPOT within a predicted perplexity increase of
+0.5%; `plan-hits`: `--max-error 0.015`, the most hits within +1.5%), then run `evaluation.run_eval.evaluate`
(moe-eval) over held-out text for resident, lru, smoe, plan and plan-hits in one run, with the emulated link calibrated as in benchmarks/policies.py (one expert load costs what it costs, relative to one
layer's compute, for Qwen2-57B-A14B on an A6000 over PCIe 4.0). Peers on the same model and prompts:
HF transformers + accelerate offloading (device_map with max_memory and an offload_folder; the experts beyond the
budget live on disk) and HF `generate` with everything resident (the runtime's own overhead).
Measured: perplexity, agreement, task accuracy, hit/substitution/drop rates, loads/token, TPOT on the emulated link.
Modeled: tpot_ms_modeled (the plan's trace replay on the dev-emulated target).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from policies import target_ratio, TARGET  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
HITS_MAX_ERROR = 0.015   # plan-hits: the most hits within a predicted perplexity increase of +1.5%
MODELS = {"demo": (ROOT / "demo" / "model", ROOT / "demo" / "data" / "calib.jsonl", ROOT / "demo" / "data" / "dev.jsonl"),
          "tiny-qwen2moe": (SHARED / "tiny-qwen2moe", SHARED / "data" / "calib.jsonl", SHARED / "data" / "dev.jsonl"),
          "tiny-qwen2moe-upcycled": (SHARED / "tiny-qwen2moe-upcycled", SHARED / "data" / "calib.jsonl",
                                     SHARED / "data" / "dev.jsonl")}


def calibrate_link(model: Path, layers: int) -> tuple[str, float]:
    from runtime import Runtime

    with Runtime.load(model, policy="resident") as rt:
        ids = torch.randint(1, rt.lm.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        rt.teacher_force(ids[:, :8])
        t0 = time.perf_counter()
        rt.teacher_force(ids)
        t_layer = (time.perf_counter() - t0) / 64 / layers
        bandwidth = rt.store.expert_bytes / (target_ratio() * t_layer)
    return f"{bandwidth / 1e6:.1f}MB/s,20us", t_layer


def hf_generate_tpot(model: Path, prompts: list[str], n: int, offload_budget: float | None) -> dict:
    """HF generate, greedy, n new tokens per prompt; with offload_budget, accelerate keeps that many bytes in RAM
    and offloads the rest to disk."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    kw = {"dtype": torch.float32}
    tmp = None
    if offload_budget is not None:
        tmp = tempfile.mkdtemp(prefix="offload-")
        kw.update(device_map="auto", max_memory={"cpu": int(offload_budget)}, offload_folder=tmp)
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(model, **kw).eval()
        times = []
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id or 0)
            t0 = time.perf_counter()
            out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
            t1 = time.perf_counter()
            m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id or 0)
            t2 = time.perf_counter()
            steps = out.shape[1] - ids.shape[1]
            times.append(((t1 - t0) - (t2 - t1)) / max(steps - 1, 1))   # per token after the first
        return {"tpot_ms": 1e3 * float(np.median(times)), "ok": True}
    except Exception as exc:  # a peer that cannot run this model is reported, not fatal
        return {"ok": False, "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def ours_generate_tpot(model: Path, prompts: list[str], n: int, **kw) -> float:
    from runtime import Runtime

    with Runtime.load(model, **kw) as rt:
        times = []
        for p in prompts:
            rt.stats.reset()
            rt.generate([p], max_new_tokens=n)
            times.append(rt.stats.tpot_s)
    return 1e3 * float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,tiny-qwen2moe,tiny-qwen2moe-upcycled")
    ap.add_argument("--budgets", default="12.5,25,50,100")
    ap.add_argument("--batches", default="1,3")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--max-tasks", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=12, help="prompts continued greedily for agreement")
    ap.add_argument("--work", default=str(ROOT / "out" / "benchmarks"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--from-json", default=None, help="rewrite the document from a saved results.json, no runs")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        out = Path(args.out)
        (out.parent / "benchmarks").mkdir(parents=True, exist_ok=True)
        write_doc(saved["results"], saved["peers"], saved["links"], out, out.parent / "benchmarks", args)
        return 0
    torch.set_num_threads(1)  # one core computes, the other runs the loader thread

    from compiler.compile_plan import CompileConfig, compile_plan
    from evaluation.run_eval import EvalConfig, evaluate
    from profiler.profile_model import ProfileConfig, profile

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    plots = out.parent / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    results, peers, links = {}, {}, {}
    prompts = ["The function returns", "And the LORD said unto", "If the argument is omitted"]
    for name in args.models.split(","):
        model, calib, dev = MODELS[name]
        prof = profile(model, str(calib), ProfileConfig(samples=32, seq_len=256), progress=False)
        prof.save(work / name / "profile")
        link, t_layer = calibrate_link(model, len(prof.moe_layers))
        links[name] = {"link": link, "t_layer_ms": 1e3 * t_layer}
        print(f"{name}: link {link}", flush=True)
        routed = prof.header["model"]["routed_expert_bytes"] * 2  # float32 run of a bf16 checkpoint
        dense = prof.header["model"]["dense_bytes"] * 2
        peers[name] = {
            "hf_generate_resident": hf_generate_tpot(model, prompts, 24, None),
            "understudy_resident": {"tpot_ms": ours_generate_tpot(model, prompts, 24, policy="resident")},
            "hf_accelerate_offload_50": hf_generate_tpot(model, prompts, 24, dense + 0.5 * routed),
            "understudy_plan_50": None,
        }
        for b in [float(x) for x in args.budgets.split(",")]:
            pct = f"{b:g}%"
            plan_dir = work / name / f"plan-{b:g}"
            compile_plan(work / name / "profile", CompileConfig(budget=pct), log=lambda *a: None).save(plan_dir)
            hits_dir = work / name / f"plan-hits-{b:g}"
            compile_plan(work / name / "profile", CompileConfig(budget=pct, max_error=HITS_MAX_ERROR),
                         log=lambda *a: None).save(hits_dir)
            if b == 50:
                peers[name]["understudy_plan_50"] = {"tpot_ms": ours_generate_tpot(
                    model, prompts, 24, policy="plan", plan=plan_dir)}
            for batch in [int(x) for x in args.batches.split(",")]:
                cfg = EvalConfig(policies=("resident", "lru", "smoe", "plan", "plan-hits"), cache=pct, batch=batch,
                                 link=link, max_tokens=args.max_tokens * batch, window=args.window,
                                 max_tasks=args.max_tasks, prompts=args.prompts)
                r = evaluate(model, str(dev), {"plan": str(plan_dir), "plan-hits": str(hits_dir)}, cfg,
                             progress=False)
                r["predicted"] = {v: json.loads((d / "plan.json").read_text())["predicted"]
                                  for v, d in (("plan", plan_dir), ("plan-hits", hits_dir))}
                results[f"{name}|{pct}|{batch}"] = r
                print(json.dumps({"model": name, "budget": pct, "batch": batch,
                                  **{p: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
                                     for p, d in r["policies"].items()}}), flush=True)
                (work / "results.json").write_text(json.dumps({"results": results, "peers": peers, "links": links}))
    write_doc(results, peers, links, out, plots, args)
    return 0


PLANS = ("plan", "plan-hits")


def goals(results, peers) -> list[str]:
    """The issues' goals, checked against this run's figures (batch 1 unless said)."""
    def get(model, pct, batch=1):
        return results.get(f"{model}|{pct}|{batch}", {})

    def mark(ok):
        return "met" if ok else "missed"

    def ppl(d, ref):
        return 100 * (d["perplexity"] / ref["perplexity"] - 1)

    out = ["## Goals", "", "Checked by the script against the figures above (fixture `tiny-qwen2moe`, batch 1, dev data), "
           "for both plans:", ""]
    for pct, limits in (("50%", dict(hit=0.85, loads=0.55, tpot=0.6, ppl=0.5, agree=0.95)),
                        ("25%", dict(hit=0.70, loads=0.6, ppl=1.5))):
        pol = get("tiny-qwen2moe", pct).get("policies")
        if not pol:
            continue
        r, lru = pol["resident"], pol["lru"]
        for v in PLANS:
            d = pol[v]
            parts = [f"hit rate {d['hit_rate']:.3f} (goal >= {limits['hit']:.2f}: {mark(d['hit_rate'] >= limits['hit'])})",
                     f"loads/token {d['loads_per_token'] / lru['loads_per_token']:.2f}x lru (goal <= {limits['loads']}x: "
                     f"{mark(d['loads_per_token'] <= limits['loads'] * lru['loads_per_token'])})"]
            if "tpot" in limits:
                parts.append(f"TPOT {d['tpot_ms'] / lru['tpot_ms']:.2f}x lru (goal <= {limits['tpot']}x: "
                             f"{mark(d['tpot_ms'] <= limits['tpot'] * lru['tpot_ms'])}; modeled "
                             f"{d['tpot_ms_modeled'] / lru['tpot_ms_modeled']:.2f}x)")
            parts.append(f"perplexity {ppl(d, r):+.2f}% vs resident (goal <= +{limits['ppl']}%: "
                         f"{mark(ppl(d, r) <= limits['ppl'])})")
            if "agree" in limits:
                parts.append(f"agreement {d['agreement']:.3f} (goal >= {limits['agree']}: "
                             f"{mark(d['agreement'] >= limits['agree'])})")
            out.append(f"- {pct} cache, `{v}`: " + "; ".join(parts) + ".")
    for name, pe in peers.items():
        hf, ours = pe["hf_generate_resident"], pe["understudy_resident"]
        if hf.get("ok", True):
            out.append(f"- {name}: resident TPOT {ours['tpot_ms'] / hf['tpot_ms']:.2f}x HF generate (goal <= 1.1x: "
                       f"{mark(ours['tpot_ms'] <= 1.1 * hf['tpot_ms'])}).")
    out += ["", "More hits and fewer loads than both lru and smoe (issue #4), measured on the dev text and predicted "
            "by the compiler on the calibration trace:", ""]
    for pct in ("12.5%", "25%", "50%"):
        res = get("tiny-qwen2moe", pct)
        pol, pred = res.get("policies"), res.get("predicted", {})
        if not pol:
            continue
        for v in PLANS:
            d, lru, sm = pol[v], pol["lru"], pol["smoe"]
            ok = d["hit_rate"] > max(lru["hit_rate"], sm["hit_rate"]) and d["loads_per_token"] < min(
                lru["loads_per_token"], sm["loads_per_token"])
            line = (f"- {pct}, `{v}`: measured hit rate {d['hit_rate']:.3f} vs lru {lru['hit_rate']:.3f} / smoe "
                    f"{sm['hit_rate']:.3f}, loads/token {d['loads_per_token']:.2f} vs {lru['loads_per_token']:.2f} / "
                    f"{sm['loads_per_token']:.2f}: {mark(ok)} (perplexity {ppl(d, pol['resident']):+.2f}%)")
            p = pred.get(v)
            if p:
                pp = p["plan"]
                pok = pp["hit_rate"] > max(p["lru"]["hit_rate"], p["smoe"]["hit_rate"]) and pp["loads_per_token"] < min(
                    p["lru"]["loads_per_token"], p["smoe"]["loads_per_token"])
                line += (f"; predicted {pp['hit_rate']:.3f} vs {p['lru']['hit_rate']:.3f} / {p['smoe']['hit_rate']:.3f}, "
                         f"{pp['loads_per_token']:.2f} vs {p['lru']['loads_per_token']:.2f} / "
                         f"{p['smoe']['loads_per_token']:.2f}: {mark(pok)}")
            out.append(line + ".")
    out += ["", "Upcycled fixture: a plan at least matches smoe's hit rate at equal or better perplexity:", ""]
    for pct in ("12.5%", "25%", "50%"):
        pol = get("tiny-qwen2moe-upcycled", pct).get("policies")
        if not pol:
            continue
        sm = pol["smoe"]
        for v in PLANS:
            d = pol[v]
            u = d.get("understudies", {})
            out.append(f"- {pct}, `{v}`: hit rate {d['hit_rate']:.3f} vs smoe {sm['hit_rate']:.3f}, perplexity "
                       f"{d['perplexity']:.3f} vs {sm['perplexity']:.3f}: "
                       f"{mark(d['hit_rate'] >= sm['hit_rate'] and d['perplexity'] <= sm['perplexity'])} "
                       f"(understudies: {u.get('band', 0)} band, {u.get('similarity', 0)} near-twin; "
                       f"dropped {d['drop_rate']:.3f} of pairs).")
    out += ["", WHY, ""]
    return out


WHY = """What the figures say (reading, not measurement; every number it leans on is in the tables and lines above):

- The profile decided the rule. Output similarity says no expert can stand in for another on these models (the
  median output error of an understudy is above 1, worse than a zero output; the upcycled experts are no near-twins
  either), so no understudy came from the similarity map. The measured loss says something else: the token's next
  router choice, weighted by its own gate, costs about what a drop costs or less at low score ratios, deeper choices
  mostly cost more, and every option's cost grows steeply with the replaced expert's score. So the plans take understudies
  from the token's next few router choices, drop or load the rest, and stop at the alpha where the predicted
  perplexity reaches their limit. The prediction comes from calibration text; the perplexity measured on 256
  held-out tokens can differ from it either way.
- Issue #4's "more hits and fewer loads than lru and smoe" holds for `plan-hits` (most hits within a predicted
  +1.5%) at 12.5, 25 and 50%, measured and predicted. The default `plan` (the fastest within +0.5%) spends its error
  budget on drops as much as on understudies, because a drop saves the same load; it has the fewest loads and the
  best TPOT but not more hits than smoe, whose prefetch buys hits with extra loads.
- Missed: agreement. Every lossy policy changes some greedy continuations (smoe too): one changed token changes the
  rest of a 16-token continuation, so agreement falls far faster than perplexity rises. Only replacing nothing keeps
  it at 1 by construction (`--lossless`: logits bit-identical to HF's).
- Missed: measured TPOT <= 0.6x lru at 50%. Loads fall to about half of lru's and the modeled TPOT on the target is
  about 0.5x, but the measured time also holds this CPU's per-token dense compute and the Python scheduling of every
  layer call, which every offloading policy pays alike and which dilute the ratio.
- 25%: within +1.5% the search finds either the hits (`plan-hits`) or the loads (`plan`, with drops), not both: on
  this model a hit beyond lru's costs an understudy (loss) or a prefetch (a load).
- Upcycled fixture: `plan-hits` passes smoe's hit rate at every budget, at equal or better perplexity only at 50%;
  at 12.5% and 25% its extra hits cost perplexity. What the profile added: understudies chosen by router rank and
  weighted as measured, drops instead of deeper understudies, non-uniform slots; what it did not: near-twins (there
  are none)."""


def sensitivity_section(work: Path, names) -> list[str]:
    """The profile's measured loss sensitivity for each model (what `moe-profile` prints)."""
    from artifacts.profile import Profile
    from profiler.summary import sensitivity_table

    out = ["## What a substitution costs (measured by moe-profile)", "",
           "Each profile replaces every low-score pair (s_i <= cut x S(k+1)) of every MoE layer by one option, on "
           "4096 calibration tokens, and measures the next-token loss: `drop` leaves the expert out, `next d` gives "
           "its weight to the token's d-th best inactive expert. The compiler charges every understudy and drop of a "
           "replayed trace with these costs (its predicted perplexity increase).", ""]
    for name in names:
        path = work / name / "profile"
        if not (path / "profile.json").is_file():
            continue
        p = Profile.load(path, with_trace=False)
        err = np.mean([float(np.median(p.substitution_error[l][~np.eye(p.num_experts, dtype=bool)]))
                       for l in p.moe_layers])
        out += [f"{name} (median output error of one expert standing in for another: {err:.2f}; 1 = a zero output):",
                "", "```", *sensitivity_table(p), "```", ""]
    return out


def write_doc(results, peers, links, out: Path, plots: Path, args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = ["# Benchmarks", "", f"Made from scratch by `python benchmarks/run_benchmarks.py` on "
             f"{platform.machine()} ({platform.processor() or 'CPU'}), 2 cores, torch {torch.__version__}, one compute "
             "thread (the other core runs the loader). No GPU: every time below is measured on this CPU with an "
             f"emulated link calibrated so that one expert load costs {target_ratio():.2f} layers of compute, as on "
             f"{TARGET['name']}; `modeled` is the plan's trace replay on the dev-emulated target. Each cell is one "
             f"moe-eval run: {args.max_tokens} held-out tokens per batch row teacher-forced one step at a time "
             f"(windows of {args.window}), {args.max_tasks} cloze tasks, {args.prompts} greedy continuations of 16 tokens "
             "for agreement with resident. Ratios are to lru in the same run. Two plans per budget: `plan` is "
             "moe-compile's default (the least modeled TPOT whose predicted perplexity increase is at most +0.5%), "
             f"`plan-hits` is `--max-error {HITS_MAX_ERROR}` (the most hits within a predicted +1.5%).", ""]
    for name, l in links.items():
        lines.append(f"- {name}: emulated link {l['link']} (one layer computes in {l['t_layer_ms']:.2f} ms here)")
    lines.append("")
    by_model: dict[str, list] = {}
    for key, r in results.items():
        name, pct, batch = key.split("|")
        by_model.setdefault(name, []).append((pct, int(batch), r))
    for name, rows in by_model.items():
        lines += [f"## {name}", "", "| budget | batch | policy | ppl | ppl vs resident | agreement | task acc | hit rate | "
                  "substituted | dropped | loads/token | loads vs lru | TPOT ms | TPOT vs lru | modeled TPOT ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for pct, batch, r in rows:
            pol = r["policies"]
            res, lru = pol["resident"], pol["lru"]
            for p, d in pol.items():
                m = "-" if d["tpot_ms_modeled"] is None else f"{d['tpot_ms_modeled']:.1f}"
                lines.append(f"| {pct} | {batch} | {p} | {d['perplexity']:.3f} | {d['perplexity'] / res['perplexity']:.4f} | "
                             f"{d['agreement']:.3f} | {d['task_accuracy']:.2f} | {d['hit_rate']:.3f} | "
                             f"{d['substitution_rate']:.3f} | {d['drop_rate']:.3f} | {d['loads_per_token']:.2f} | "
                             f"{d['loads_per_token'] / max(lru['loads_per_token'], 1e-9):.2f} | {d['tpot_ms']:.1f} | "
                             f"{d['tpot_ms'] / lru['tpot_ms']:.2f} | {m} |")
        lines.append("")
        pe = peers[name]
        lines += ["Peers (greedy generation of 24 tokens from 3 prompts, median time per token after the first):", ""]
        for k, v in pe.items():
            if v is None:
                continue
            lines.append(f"- {k}: " + (f"{v['tpot_ms']:.1f} ms" if v.get("ok", True) else f"could not run ({v['error']})"))
        lines.append("")
        fig = Figure(figsize=(10, 3.4), dpi=100)
        FigureCanvasAgg(fig)
        for n, (key, label) in enumerate((("hit_rate", "hit rate"), ("loads_per_token", "loads/token"),
                                          ("perplexity", "perplexity"))):
            ax = fig.add_subplot(1, 3, n + 1)
            for p, style in (("lru", "o-"), ("smoe", "s-"), ("plan", "^-"), ("plan-hits", "v--")):
                pts = sorted((float(pct[:-1]), r["policies"][p][key]) for pct, batch, r in rows if batch == 1)
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=p)
            ax.set_xlabel("cache (% of routed-expert bytes)")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / f"{name}.png")
        lines += [f"![{name}](benchmarks/{name}.png)", ""]
    lines += ["Peers run without the emulated link: HF + accelerate reads the experts beyond its memory budget from its "
              "offload folder (page cache), the runtime's plan from the mmap'd checkpoint.", ""]
    lines += sensitivity_section(Path(args.work), by_model)
    lines += goals(results, peers)
    old = out.read_text() if out.is_file() else ""
    if "<!-- memory:begin -->" in old:        # benchmarks/memory.py's section is its own: kept as it was
        lines += ["", old[old.rindex("\n## ", 0, old.index("<!-- memory:begin -->")) + 1:].rstrip()]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
