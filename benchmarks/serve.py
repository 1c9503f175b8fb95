"""Benchmark: the OpenAI-compatible server (moe-serve) under concurrent streaming clients, lru against plan.

    python benchmarks/serve.py                  # the full run; prints the section's markdown
    python benchmarks/serve.py --write          # ... and writes it into docs/BENCHMARKS.md (section "serve")
    python benchmarks/serve.py --quick          # a ~1 minute smoke run (1 and 3 clients, short requests)
    python benchmarks/serve.py --from-json out/benchmarks/serve.json [--write]   # the text again, no runs

For each policy (lru at `--cache 50%`, plan with the 50% plan) the server runs as a subprocess on 127.0.0.1 (a free
port, `--max-batch 8`, the same emulated link, one compute thread: OMP_NUM_THREADS=1). After /health answers, two
warm-up requests run, then one phase per concurrency C (1, 2, 3, 8): C client threads each send their requests one
after the other (streaming /v1/completions, temperature 0, max_tokens fixed, a distinct held-out prompt per
request, the same prompts for both policies, `ignore_eos` so every request decodes max_tokens), until each has sent its share or the phase's wall-clock bound has
passed. Per request the arrival time of every streamed chunk is recorded:
    TTFT = first chunk - request sent;  TPOT = (last chunk - first chunk) / (completion_tokens - 1)
    tokens/s of a phase = sum of usage.completion_tokens / (last response end - phase start)
/metrics is read before and after each phase: hit rate and loads per token of the phase are differences of the
server's cumulative counters (understudy_pairs_total by kind, loads, decode positions), and the cache's peak bytes
are checked against its budget (the plan's budget; for lru, the bytes `--cache` gives). Each policy runs `--repeats`
times, alternating which goes first; tables show the mean and, with repeats, the range.

The link is calibrated as benchmarks/run_benchmarks.py does (benchmarks/emulated_link.py) unless `--link` is given.
The plan is `--plan`, else out/benchmarks/MODEL/plan-50 (run_benchmarks.py's) when it fits the model, else one made
here (profile on the calibration text as run_benchmarks.py does, then moe-compile's default at the budget) in
out/benchmarks/serve-work/. Raw results: out/benchmarks/serve.json (--quick: serve-quick.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
HEADING = "## Serving: throughput and TPOT under concurrent clients"
SECTION = "serve"
POLICIES = ("lru", "plan")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FULL = {"concurrency": "1,2,3,8", "repeats": 2, "max_tokens": 48, "per_client": 4, "min_requests": 8,
        "phase_limit_s": 120.0}
QUICK = {"concurrency": "1,3", "repeats": 1, "max_tokens": 16, "per_client": 2, "min_requests": 2,
         "phase_limit_s": 30.0}


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ---- inputs: plan, link, prompts -------------------------------------------------------------------------------
def plan_fits(plan_dir: Path, model: Path) -> str | None:
    """None when the plan in plan_dir loads and was compiled for `model`; else why not."""
    from artifacts.errors import UserError
    from artifacts.plan import Plan
    from runtime.model_loader import load_model
    from runtime.runtime import check_plan_matches

    try:
        plan = Plan.load(plan_dir)
        check_plan_matches(plan, load_model(model, "cpu", None), model)
    except UserError as exc:
        return str(exc)
    return None


def resolve_plan(args, t0: float) -> Path:
    """--plan; else run_benchmarks.py's plan for this model and budget when it fits; else make one in serve-work."""
    model, pct = Path(args.model), f"{args.budget:g}"
    if args.plan:
        why = plan_fits(Path(args.plan), model)
        if why:
            sys.exit(f"serve.py: --plan {args.plan}: {why}")
        return Path(args.plan)
    for d in (ROOT / "out" / "benchmarks" / model.name / f"plan-{pct}",
              ROOT / "out" / "benchmarks" / "serve-work" / model.name / f"plan-{pct}"):
        if (d / "plan.json").exists():
            why = plan_fits(d, model)
            if why is None:
                return d
            log(t0, f"not using {d}: {why}")
    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile

    work = ROOT / "out" / "benchmarks" / "serve-work" / model.name
    log(t0, f"profiling {model.name} on {args.calib} (32 windows of 256 tokens, as run_benchmarks.py)")
    profile(model, str(args.calib), ProfileConfig(samples=32, seq_len=256), progress=False).save(work / "profile")
    log(t0, f"compiling the {pct}% plan (moe-compile's default objective)")
    compile_plan(work / "profile", CompileConfig(budget=f"{pct}%"), log=lambda *a: None).save(work / f"plan-{pct}")
    return work / f"plan-{pct}"


def resolve_link(args, plan_dir: Path) -> dict:
    if args.link != "auto":
        return {"link": args.link, "calibrated": False}
    import torch

    from artifacts.plan import Plan
    from emulated_link import calibrate_link

    torch.set_num_threads(1)   # as the server computes
    layers = len(Plan.load(plan_dir).header["model"]["moe_layers"])
    link, t_layer = calibrate_link(Path(args.model), layers)
    return {"link": link, "calibrated": True, "t_layer_ms": 1e3 * t_layer}


def load_prompts(path: Path, source: str, chars: int) -> list[str]:
    """Held-out texts of `source` ("all": any) long enough to cut at `chars`, cut at the last space before it."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        text = d["text"].strip()
        if (source != "all" and d.get("source") != source) or len(text) <= chars:
            continue
        cut = text[:chars]
        out.append(cut[:cut.rfind(" ")] if " " in cut else cut)
    return out


def per_client(c: int, cfg: dict) -> int:
    return max(cfg["per_client"], math.ceil(cfg["min_requests"] / c))


def assign_prompts(prompts: list[str], levels: list[int], cfg: dict) -> tuple[list[str], dict[int, list[list[str]]]]:
    """Two warm-up prompts, then for each concurrency C, C lists (one per client) of distinct prompts; every
    prompt is used once per server run."""
    need = 2 + sum(c * per_client(c, cfg) for c in levels)
    if len(prompts) < need:
        sys.exit(f"serve.py: {len(prompts)} usable prompts, {need} needed; lower --per-client or use --source all")
    it = iter(prompts)
    warm = [next(it), next(it)]
    return warm, {c: [[next(it) for _ in range(per_client(c, cfg))] for _ in range(c)] for c in levels}


# ---- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moe-serve as a subprocess; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, model: Path, policy_args: list[str], link: str, max_batch: int, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "runtime.server.cli", str(model), *policy_args, "--host", "127.0.0.1",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--link", link]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **THREAD_ENV})
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /health within 300 s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def metrics(self) -> dict[str, float]:
        """The unlabelled understudy_* samples of /metrics, and the pair counters by kind ("pairs:KIND")."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=60).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if not s.labels:
                    out[s.name] = s.value
                elif s.name == "understudy_pairs_total":
                    out["pairs:" + s.labels["kind"]] = s.value
        return out


# ---- clients ---------------------------------------------------------------------------------------------------
def stream_one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: send time, each chunk's arrival (perf_counter s), usage and finish reason."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}   # every request decodes max_tokens: phases compare equal work
    rec = {"t_send": time.perf_counter(), "chunks": [], "finish": None, "usage": None, "error": None}
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return rec
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                now, data = time.perf_counter(), line[6:]
                if data == "[DONE]":
                    break
                d = json.loads(data)
                if "error" in d:
                    rec["error"] = d["error"].get("message")
                    break
                if d.get("choices"):
                    ch = d["choices"][0]
                    if ch.get("text") or ch.get("finish_reason"):
                        rec["chunks"].append(now)
                    rec["finish"] = ch.get("finish_reason") or rec["finish"]
                if d.get("usage"):
                    rec["usage"] = d["usage"]
    except Exception as exc:  # noqa: BLE001 - recorded, the phase carries on
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["t_end"] = time.perf_counter()
    return rec


def run_phase(url: str, model: str, clients: list[list[str]], max_tokens: int, limit_s: float) -> dict:
    """Each client sends its prompts one after the other until done or `limit_s` has passed since the start."""
    import httpx

    records: list[list[dict]] = [[] for _ in clients]
    start = [0.0]
    barrier = threading.Barrier(len(clients) + 1, action=lambda: start.__setitem__(0, time.perf_counter()))

    def client(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=30.0)) as c:
            try:
                c.get(url + "/health")   # connected before the phase starts
            except httpx.HTTPError:
                pass                     # the request itself will record the failure
            barrier.wait()
            for p in clients[i]:
                if time.perf_counter() - start[0] > limit_s:
                    break
                records[i].append(stream_one(c, url, model, p, max_tokens))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    barrier.wait()                       # the phase starts when every client is connected
    for t in threads:
        t.join()
    recs = [r for rs in records for r in rs]
    wall = max((r["t_end"] for r in recs), default=start[0]) - start[0]
    sent = sum(len(c) for c in clients)
    return {"wall_s": wall, "requests": recs, "planned": sent, "bounded": len(recs) < sent, "t0": start[0]}


def percentile(xs: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def summarize(phase: dict, before: dict, after: dict, budget: float) -> dict:
    """Figures of one phase (times in ms); the cache figures from the /metrics counters' differences."""
    ok = [r for r in phase["requests"] if r["error"] is None and r["usage"] and r["chunks"]]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok)
    tpot = [1e3 * (r["chunks"][-1] - r["chunks"][0]) / (r["usage"]["completion_tokens"] - 1)
            for r in ok if r["usage"]["completion_tokens"] > 1 and len(r["chunks"]) > 1]
    ttft = [1e3 * (r["chunks"][0] - r["t_send"]) for r in ok]
    pos = after["understudy_decode_positions_total"] - before["understudy_decode_positions_total"]
    loads = after["understudy_expert_loads_total"] - before["understudy_expert_loads_total"]
    kinds = [k for k in after if k.startswith("pairs:")]
    pairs = {k: after[k] - before.get(k, 0.0) for k in kinds}
    served = pairs.get("pairs:exact", 0.0) + pairs.get("pairs:understudy", 0.0)
    all_pairs = sum(pairs.values())
    peak = after["understudy_cache_peak_bytes"]
    return {"requests": len(phase["requests"]), "planned": phase["planned"], "bounded": phase["bounded"],
            "errors": [r["error"] for r in phase["requests"] if r["error"] is not None],
            "to_length": sum(r["finish"] == "length" for r in ok), "completion_tokens": tokens,
            "wall_s": phase["wall_s"], "tokens_per_s": tokens / phase["wall_s"] if phase["wall_s"] > 0 else 0.0,
            "tpot_p50_ms": percentile(tpot, 50), "tpot_p95_ms": percentile(tpot, 95), "tpot_n": len(tpot),
            "ttft_p50_ms": percentile(ttft, 50), "decode_positions": pos,
            "hit_rate": served / all_pairs if all_pairs else None, "loads_per_token": loads / pos if pos else None,
            "cache_peak_bytes": peak, "cache_budget_bytes": budget, "within_budget": peak <= budget}


def run_policy(policy: str, args, cfg: dict, plan_dir: Path, link: str, warm: list[str],
               phases: dict[int, list[list[str]]], logs: Path, t0: float, rep: int) -> dict:
    policy_args = ["--plan", str(plan_dir)] if policy == "plan" else ["--policy", policy, "--cache", f"{args.budget:g}%"]
    with Server(Path(args.model), policy_args, link, args.max_batch, logs / f"{policy}-{rep}.log") as srv:
        model = Path(args.model).resolve().name
        log(t0, f"{policy} (repeat {rep + 1}): server up in {srv.start_s:.1f} s on port {srv.port}")
        import httpx

        with httpx.Client(timeout=600.0) as c:
            for p in warm:
                r = stream_one(c, srv.url, model, p, cfg["max_tokens"])
                if r["error"]:
                    raise RuntimeError(f"warm-up request failed: {r['error']}\n{srv.log_tail()}")
        before = srv.metrics()
        budget = before["understudy_cache_budget_bytes"]
        out = {"policy": policy, "repeat": rep, "server_start_s": srv.start_s, "command": srv.cmd[1:],
               "budget_source": "plan" if policy == "plan" else "--cache capacity",
               "phases": {}, "raw": {}}
        for c, clients in phases.items():
            ph = run_phase(srv.url, model, clients, cfg["max_tokens"], cfg["phase_limit_s"])
            after = srv.metrics()
            s = summarize(ph, before, after, budget)
            out["phases"][str(c)] = s
            out["raw"][str(c)] = [{"t_send": r["t_send"] - ph["t0"], "chunks": [t - ph["t0"] for t in r["chunks"]],
                                   "t_end": r["t_end"] - ph["t0"], "finish": r["finish"], "usage": r["usage"],
                                   "error": r["error"]} for r in ph["requests"]]
            before = after
            log(t0, f"{policy} C={c}: {s['tokens_per_s']:.1f} tok/s, TPOT p50 {s['tpot_p50_ms']:.1f} ms "
                    f"p95 {s['tpot_p95_ms']:.1f} ms, TTFT p50 {s['ttft_p50_ms']:.0f} ms, hit "
                    f"{s['hit_rate']:.3f}, loads/token {s['loads_per_token']:.2f}, {s['to_length']}/"
                    f"{s['requests']} to length, {s['wall_s']:.1f} s" + (f", {len(s['errors'])} errors"
                                                                         if s["errors"] else ""))
        out["final_metrics"] = before
    return out


# ---- the section -----------------------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def cell(xs: list[float], fmt: str) -> str:
    """The mean, and the range when there are repeats."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(mean(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def ratio_cell(f: dict, key: str) -> str:
    """The ratio of the means, and the range of the per-repeat ratios when there are repeats."""
    xs = f[key]
    r = f"{f[key + '_mean']:.2f}"
    return r if len(xs) == 1 else f"{r} ({min(xs):.2f}–{max(xs):.2f})"


def figures(result: dict) -> dict[int, dict]:
    """Per concurrency: per policy the repeats' values, and the per-repeat ratios plan/lru."""
    runs = result["runs"]
    levels = sorted({int(c) for r in runs for c in r["phases"]})
    reps = sorted({r["repeat"] for r in runs})
    out = {}
    for c in levels:
        f = {}
        for p in POLICIES:
            ph = [r["phases"][str(c)] for rep in reps for r in runs if r["policy"] == p and r["repeat"] == rep]
            f[p] = {k: [x[k] for x in ph] for k in ("tokens_per_s", "tpot_p50_ms", "tpot_p95_ms", "ttft_p50_ms",
                                                    "hit_rate", "loads_per_token")}
        f["tps_ratio"] = [a / b for a, b in zip(f["plan"]["tokens_per_s"], f["lru"]["tokens_per_s"])]
        f["tpot_ratio"] = [a / b for a, b in zip(f["plan"]["tpot_p50_ms"], f["lru"]["tpot_p50_ms"])]
        f["tps_ratio_mean"] = mean(f["plan"]["tokens_per_s"]) / mean(f["lru"]["tokens_per_s"])
        f["tpot_ratio_mean"] = mean(f["plan"]["tpot_p50_ms"]) / mean(f["lru"]["tpot_p50_ms"])
        out[c] = f
    return out


def compare(figs: dict[int, dict], key: str, higher_better: bool, what: str, a: int = 3, b: int = 1) -> str:
    """The sentence comparing the ratio `key` at `a` clients with that at `b`, on the displayed (2-decimal)
    values; with repeats, whether the per-repeat ranges overlap."""
    ra, rb = round(figs[a][f"{key}_mean"], 2), round(figs[b][f"{key}_mean"], 2)
    verdict = ("the same (to two decimals)" if ra == rb else
               "better" if (ra > rb) == higher_better else "not better")
    s = f"{what}: {ra:.2f} at {a} clients against {rb:.2f} at {b}, {verdict}"
    la, lb = figs[a][key], figs[b][key]
    if len(la) > 1:
        overlap = max(min(la), min(lb)) <= min(max(la), max(lb))
        s += (f" (per repeat {', '.join(f'{x:.2f}' for x in la)} against {', '.join(f'{x:.2f}' for x in lb)}; the "
              f"ranges {'overlap' if overlap else 'do not overlap'})")
    else:
        s += " (one repeat: no spread measured)"
    return s + "."


def section(result: dict) -> str:
    m, cfg = result["meta"], result["config"]
    figs = figures(result)
    runs = result["runs"]
    link = result["link"]
    link_text = (f"`{link['link']}`, calibrated by benchmarks/emulated_link.py (one layer's compute here "
                 f"{link['t_layer_ms']:.2f} ms)" if link.get("calibrated") else f"`{link['link']}` (given)")
    n_reps = cfg["repeats"]
    lines = [
        f"Made by `{m['command']}` in {m['wall_s']:.0f} s on {m['machine']}, torch {m['torch']}; started "
        f"{m['started']}. Model {m['model']}; lru at `--cache {cfg['budget']:g}%`, plan `{m['plan_rel']}` "
        f"(moe-compile's default objective at {cfg['budget']:g}%, compiled for batch {m['plan_batch']}). Each policy "
        f"runs `moe-serve --max-batch {cfg['max_batch']} --link ...` as a subprocess with one compute thread "
        f"(OMP_NUM_THREADS=1), emulated link {link_text}. After two warm-up requests, one phase per concurrency: C "
        f"client threads each send {cfg['per_client']} (at least {cfg['min_requests']} per phase in all) streamed "
        f"`/v1/completions` requests one after another, temperature 0, max_tokens {cfg['max_tokens']} with `ignore_eos` "
        f"(every request decodes them all), each a "
        f"distinct held-out prompt ({cfg['prompt_source']} texts of dev.jsonl cut to {cfg['prompt_chars']} "
        f"characters; the same prompts for both policies), within a {cfg['phase_limit_s']:.0f} s bound per phase. "
        f"tokens/s = completion tokens (usage) / phase wall time; TPOT per request = (last chunk - first chunk) / "
        f"(completion tokens - 1), p50/p95 over the phase's requests; TTFT = first chunk - sent. Hit rate and loads "
        f"per token are the phase's, from the differences of the server's /metrics counters. "
        + (f"{n_reps} repeats per policy, alternating which policy runs first; cells show the mean and (the range)."
           if n_reps > 1 else "One run per policy: no spread measured."), "",
        "| clients | tok/s lru | tok/s plan | plan/lru tok/s | p50 TPOT lru (ms) | p50 TPOT plan (ms) | "
        "plan/lru p50 TPOT | p95 TPOT lru / plan (ms) | p50 TTFT lru / plan (ms) | hit rate lru / plan | "
        "loads/token lru / plan |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, f in figs.items():
        lru, plan = f["lru"], f["plan"]
        lines.append(
            f"| {c} | {cell(lru['tokens_per_s'], '.1f')} | {cell(plan['tokens_per_s'], '.1f')} | "
            f"{ratio_cell(f, 'tps_ratio')} | "
            f"{cell(lru['tpot_p50_ms'], '.1f')} | {cell(plan['tpot_p50_ms'], '.1f')} | "
            f"{ratio_cell(f, 'tpot_ratio')} | "
            f"{mean(lru['tpot_p95_ms']):.1f} / {mean(plan['tpot_p95_ms']):.1f} | "
            f"{mean(lru['ttft_p50_ms']):.0f} / {mean(plan['ttft_p50_ms']):.0f} | "
            f"{mean(lru['hit_rate']):.3f} / {mean(plan['hit_rate']):.3f} | "
            f"{mean(lru['loads_per_token']):.2f} / {mean(plan['loads_per_token']):.2f} |")
    lines.append("")
    if n_reps > 1:
        lines += ["Ratios are of the means; in brackets, the range of the per-repeat ratios (each repeat's plan over "
                  "the same repeat's lru).", ""]
    if 1 in figs and 3 in figs:
        lines.append("The issue expects plan's advantage over lru to be larger at batch 3 than at batch 1, as the "
                     "paper reports. Measured here:")
        lines.append("- " + compare(figs, "tps_ratio", True, "plan/lru aggregate tokens/s"))
        lines.append("- " + compare(figs, "tpot_ratio", False, "plan/lru p50 TPOT (lower is better for plan)"))
        lines.append("")
    phases = [(r["policy"], r["repeat"], c, s) for r in runs for c, s in r["phases"].items()]
    reqs = sum(s["requests"] for *_, s in phases)
    to_len = sum(s["to_length"] for *_, s in phases)
    over = [f"{p} C={c} (repeat {rep + 1})" for p, rep, c, s in phases if not s["within_budget"]]
    errors = sum(len(s["errors"]) for *_, s in phases)
    bounded = [f"{p} C={c}" for p, rep, c, s in phases if s["bounded"]]
    budgets = {r["policy"]: (r["phases"][next(iter(r["phases"]))]["cache_budget_bytes"], r["budget_source"])
               for r in runs}
    prompt_lens = [q["usage"]["prompt_tokens"] for r in runs for qs in r["raw"].values() for q in qs if q["usage"]]
    prompt_mean = sum(prompt_lens) / max(len(prompt_lens), 1)
    lines.append(
        f"{to_len} of {reqs} measured requests ran to max_tokens"
        + ("; " if to_len == reqs else f"; the other {reqs - to_len} ended at EOS or failed; ")
        + f"prompts averaged {prompt_mean:.0f} tokens. TTFT includes the wait for a batch slot and the prefill of "
        "the request (admitted at the next decode step, its prompt prefilled before that step's decode). "
        + (f"{errors} requests failed. " if errors else "No request failed. ")
        + ("Every phase sent all its requests within its bound. " if not bounded else
           f"The wall-clock bound cut short {', '.join(bounded)}. ")
        + ("The expert cache's peak bytes (understudy_cache_peak_bytes) stayed within the budget in all "
           f"{len(phases)} phases" if not over else f"The cache's peak bytes exceeded its budget in {', '.join(over)}")
        + " (" + "; ".join(f"{p}: {b / 2**20:.2f} MiB, {src}" for p, (b, src) in budgets.items()) + ")."
        + f" Server start to /health: {min(r['server_start_s'] for r in runs):.0f}–"
          f"{max(r['server_start_s'] for r in runs):.0f} s.")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "tiny-qwen2moe"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "calib.jsonl"))
    ap.add_argument("--dev", default=str(SHARED / "data" / "dev.jsonl"))
    ap.add_argument("--budget", type=float, default=50.0, help="cache budget, %% of routed-expert bytes")
    ap.add_argument("--plan", default=None, help="plan directory for that budget (default: found or made)")
    ap.add_argument("--link", default="auto", help="emulated link spec, or auto: calibrate (emulated_link.py)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--concurrency", default=None, help=f"client counts (default {FULL['concurrency']})")
    ap.add_argument("--repeats", type=int, default=None, help=f"runs per policy (default {FULL['repeats']})")
    ap.add_argument("--max-tokens", type=int, default=None, help=f"per request (default {FULL['max_tokens']})")
    ap.add_argument("--per-client", type=int, default=None, help=f"requests per client (default {FULL['per_client']})")
    ap.add_argument("--min-requests", type=int, default=None,
                    help=f"requests per phase at least (default {FULL['min_requests']})")
    ap.add_argument("--phase-limit", type=float, default=None,
                    help=f"wall-clock bound per phase, s (default {FULL['phase_limit_s']:g})")
    ap.add_argument("--source", default="all", help="dev.jsonl source of the prompts (all: any); requests ignore "
                    "EOS, so every one decodes max_tokens")
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (not for the document)")
    ap.add_argument("--json", default=None, help="raw results (default out/benchmarks/serve.json; --quick: "
                    "serve-quick.json)")
    ap.add_argument("--from-json", default=None, help="write the section from saved raw results, no runs")
    ap.add_argument("--write", action="store_true", help="write the section into --out (default: print it)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sections import write_section

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if args.quick and args.write and Path(args.out).resolve() == (ROOT / "docs" / "BENCHMARKS.md").resolve():
            sys.exit("serve.py: --quick is a smoke run; it does not write docs/BENCHMARKS.md (give --out elsewhere)")
        result = measure(args)
    text = section(result)
    if args.write:
        write_section(args.out, SECTION, HEADING, text)
        print(f"wrote section '{SECTION}' of {args.out}", file=sys.stderr)
    print(f"{HEADING}\n\n{text}")
    return 0


def measure(args) -> dict:
    import torch

    base = QUICK if args.quick else FULL
    cfg = {**base, **{k: v for k, v in (("concurrency", args.concurrency), ("repeats", args.repeats),
                                        ("max_tokens", args.max_tokens), ("per_client", args.per_client),
                                        ("min_requests", args.min_requests), ("phase_limit_s", args.phase_limit))
                      if v is not None}}
    cfg.update(budget=args.budget, max_batch=args.max_batch, prompt_source=args.source, prompt_chars=args.prompt_chars,
               quick=args.quick)
    levels = [int(x) for x in str(cfg["concurrency"]).split(",")]
    if any(c > args.max_batch for c in levels):
        print(f"serve.py: note: concurrency above --max-batch {args.max_batch} queues requests", file=sys.stderr)
    json_path = Path(args.json or ROOT / "out" / "benchmarks" / ("serve-quick.json" if args.quick else "serve.json"))
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    plan_dir = resolve_plan(args, t0)
    link = resolve_link(args, plan_dir)
    log(t0, f"plan {plan_dir}; link {link['link']}")
    from artifacts.plan import Plan

    warm, phases = assign_prompts(load_prompts(Path(args.dev), args.source, args.prompt_chars), levels, cfg)
    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        logs = Path(tmp)
        for rep in range(cfg["repeats"]):
            for policy in (POLICIES if rep % 2 == 0 else POLICIES[::-1]):
                runs.append(run_policy(policy, args, cfg, plan_dir, link["link"], warm, phases, logs, t0, rep))
    try:
        plan_rel = os.path.relpath(plan_dir, ROOT)
    except ValueError:
        plan_rel = str(plan_dir)
    command = shlex.join(["python", "benchmarks/serve.py", *sys.argv[1:]])
    result = {"meta": {"command": command, "started": started, "wall_s": time.perf_counter() - t0,
                       "machine": f"{platform.platform()} ({platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} CPUs)", "torch": torch.__version__,
                       "model": Path(args.model).name, "plan": str(plan_dir), "plan_rel": plan_rel,
                       "plan_batch": Plan.load(plan_dir).choices.batch, "server_env": THREAD_ENV},
              "config": cfg, "link": link, "runs": runs}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    log(t0, f"raw results in {json_path}")
    return result


if __name__ == "__main__":
    sys.exit(main())
