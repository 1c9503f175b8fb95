"""`evaluate(...)`: every policy over the same tokens, in one run. `resident` (exact: every expert in place) runs
first, as the reference of both agreements; it is reported when asked for.

perplexity        exp(sum NLL / predicted tokens) over the stream's first N tokens cut into windows of `window`
                  tokens; each window predicts its tokens 2..len from the ones before. Tokens pass one step at a time
                  with the KV cache (Runtime.teacher_force), so the expert cache sees what it sees when generating;
                  `batch` windows run side by side as the rows of one batch. `window_nll` keeps [NLL sum, tokens]
                  per window (the same windows for every policy: evaluation.stats.paired_bootstrap pairs them).
top1_agreement    teacher-forced argmax agreement with resident at every predicted position of that pass
                  (evaluation.agreement).
greedy_agreement  share of resident's greedy continuation reproduced before the first difference, averaged over
                  `prompts` prompts of `prompt_len` tokens taken at even spacing from the stream; `greedy_tokens`
                  continuation tokens each.
task_accuracy     log-likelihood multiple choice (evaluation.tasks). By default cloze tasks built by
                  evaluation.make_tasks.cloze_tasks from the held-out texts: those of the data after the last text
                  the perplexity stream reads (so no task sentence is in the stream). `tasks`: a task file instead,
                  or "none" to skip.
rates             from the runtime's counters over the perplexity pass (decode steps only).
tpot_ms           wall time per decode step of that pass (with --link, on the emulated link);
tpot_ms_modeled   the plan's modeled TPOT for that policy on its target (needs --plan).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from artifacts.errors import UserError
from artifacts.profile import Profile
from artifacts.texts import read_texts
from evaluation.agreement import greedy_agreement, top1_agreement
from evaluation.data import EvalText, prompts, read_eval_text, windows
from evaluation.make_tasks import cloze_tasks
from evaluation.passes import PerplexityPass, greedy_pass, perplexity_pass, task_pass
from evaluation.stats import paired_bootstrap
from evaluation.tasks import EncodedTask, Task, encode, load_tasks, score
from runtime.policy.config import POLICIES, SIZED_BY_CACHE, check_runnable

REFERENCE = "resident"
NO_TASKS = "none"                     # EvalConfig.tasks value that skips tasks


@dataclass(frozen=True)
class EvalConfig:
    policies: tuple[str, ...] = ("resident", "lru", "smoe", "plan")
    cache: str = "25%"
    batch: int = 1
    link: str | None = None
    max_tokens: int = 2048
    window: int | None = None         # default: 512, or the model's context if shorter
    tasks: str | None = None          # None: cloze tasks from the held-out texts; a .jsonl file; "none": no tasks
    max_tasks: int = 40
    prompts: int = 8
    prompt_len: int = 16
    gen_tokens: int = 16
    profile: str | None = None        # profile directory of the model: policy static pins its most frequent experts
    device: str = "cpu"
    dtype: str | None = None
    text_field: str = "text"
    threads: int = 1                  # torch compute threads: one leaves a core to the loader thread (and a busy
                                      # core cannot stall every op, as it does a multi-threaded one)


@dataclass(frozen=True)
class Reference:
    """resident's outputs that the other policies are compared with."""
    argmax: torch.Tensor              # [predicted tokens] of the perplexity pass
    greedy: list[list[int]]           # per prompt: its greedy continuation


def evaluate(model_dir: str | Path, data: str, plan: str | Path | Mapping[str, str | Path] | None = None,
             config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """`plan`: one plan directory (policy "plan") or {policy name: plan directory} to compare several."""
    plan_dirs = {} if plan is None else ({"plan": plan} if isinstance(plan, (str, Path)) else dict(plan))
    unknown = [p for p in config.policies if p not in POLICIES and p not in plan_dirs]
    if unknown:
        try:
            check_runnable(unknown[0])
        except UserError as exc:
            raise UserError(str(exc) + (f" or a plan given ({', '.join(plan_dirs)})" if plan_dirs else "")) from None
    missing = [p for p in config.policies if p == "plan" and p not in plan_dirs]
    if missing:
        raise UserError("policy 'plan' needs --plan PLAN_DIR (run moe-compile), or leave it out of --policies")
    static = "static" in config.policies
    if static and config.profile is None:
        raise UserError("policy static pins each layer's most frequently routed experts from a profile: pass "
                        "--profile PROFILE_DIR (what moe-profile wrote for this model), or leave static out")
    if config.profile is not None and not static:
        raise UserError("--profile is read by policy static only (its pinned experts); add static to --policies, "
                        "or drop --profile")
    if config.batch < 1 or (config.window is not None and config.window < 2) or config.max_tokens < 2:
        raise UserError("--batch must be >= 1, --window and --max-tokens >= 2")
    if config.max_tasks < 1:
        raise UserError(f"--max-tasks must be at least 1 (got {config.max_tasks})")
    if config.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {config.threads})")
    from artifacts.plan import Plan
    from runtime.link import parse_link

    plans = {name: Plan.load(path) for name, path in plan_dirs.items()}     # fail before any model work
    profile = None if config.profile is None else Profile.load(config.profile, with_trace=False)
    if config.link is not None:
        parse_link(config.link)
    file_tasks = None if config.tasks in (None, NO_TASKS) else load_tasks(config.tasks, config.max_tasks)
    texts, _ = read_texts(data, config.text_field)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _evaluate(model_dir, data, texts, plan_dirs, plans, profile, file_tasks, config, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Inputs:
    """What every policy is measured on."""
    windows: list[np.ndarray]         # perplexity windows of the stream, each [<= window] token ids
    prompts: np.ndarray               # [P, prompt_len] token ids, continued greedily
    tasks: list[Task] | None          # None: tasks skipped
    encoded: list[EncodedTask]        # the tasks' token ids


def _evaluate(model_dir, data: str, texts: list[str], plan_dirs: dict, plans: dict, profile: Profile | None,
              file_tasks: list[Task] | None, config: EvalConfig, progress: bool) -> dict:
    from runtime import Runtime
    from runtime.policy.slots import resolve_slots
    from runtime.runtime import check_plan_matches, check_profile_matches

    with Runtime.load(model_dir, _run_config(REFERENCE, plans, profile, config)) as ref_rt:
        if ref_rt.tokenizer is None:
            raise UserError(f"{model_dir} has no tokenizer; evaluation needs one")
        arch = ref_rt.lm.arch
        window = config.window or min(512, arch.max_positions or 512)
        if arch.max_positions is not None and window > arch.max_positions:
            raise UserError(f"--window {window} is over the model's limit of {arch.max_positions} positions; "
                            f"use --window {arch.max_positions} or less")
        if any(p in SIZED_BY_CACHE for p in config.policies):
            resolve_slots(config.cache, arch.moe_layers, arch.num_experts)
        for name in plan_dirs:
            check_plan_matches(plans[name], ref_rt.lm, model_dir)
        if profile is not None:
            check_profile_matches(profile, ref_rt.lm, model_dir)
        text = read_eval_text(data, ref_rt.tokenizer, config.max_tokens, config.text_field, texts)
        tasks = file_tasks if file_tasks is not None else _data_tasks(data, text, config)
        encoded = [encode(t, ref_rt.tokenizer) for t in tasks or []]
        _check_task_lengths(encoded, arch.max_positions)
        inputs = Inputs(windows(text.stream, window), prompts(text.stream, config.prompts, config.prompt_len),
                        tasks, encoded)
        ref_entry, reference = _measure(ref_rt, REFERENCE, inputs, None, REFERENCE in config.policies,
                                        _modeled_tpot(REFERENCE, plans), config, progress)
    results = {}
    for name in config.policies:
        if name == REFERENCE:
            results[name] = ref_entry
            continue
        with Runtime.load(model_dir, _run_config(name, plans, profile, config), plan=plans.get(name)) as rt:
            results[name], _ = _measure(rt, name, inputs, reference, True, _modeled_tpot(name, plans), config,
                                        progress)
    return {"model": str(model_dir), "data": str(data), "tokens": int(len(text.stream)),
            "windows": len(inputs.windows), "window": window, "batch": config.batch, "link": config.link,
            "cache": config.cache, "plan": str(plan_dirs["plan"]) if "plan" in plan_dirs else None,
            "plans": {k: str(v) for k, v in plan_dirs.items()},
            "profile": None if config.profile is None else str(config.profile),
            "reference": REFERENCE, "prompts": int(inputs.prompts.shape[0]), "greedy_tokens": config.gen_tokens,
            "tasks": None if tasks is None else {
                "source": "held-out data" if file_tasks is None else str(config.tasks), "count": len(tasks),
                "sha256": hashlib.sha256(json.dumps([t.to_dict() for t in tasks]).encode()).hexdigest()},
            "policies": results}


def _run_config(name: str, plans: dict, profile: Profile | None, config: EvalConfig):
    """The run configuration of one evaluated policy (a named plan runs as policy plan, with its plan; static with
    the profile)."""
    from runtime.config import RunConfig

    base = RunConfig(device=config.device, dtype=config.dtype)
    if name == REFERENCE:
        return replace(base, policy=REFERENCE)
    if name in plans:
        return replace(base, policy="plan", link=config.link)
    return replace(base, policy=name, cache=config.cache, link=config.link,
                   profile=profile if name == "static" else None)


def _data_tasks(data: str, text: EvalText, config: EvalConfig) -> list[Task] | None:
    """The default tasks: cloze questions from the held-out texts; None when tasks are skipped."""
    if config.tasks == NO_TASKS:
        return None
    tasks = cloze_tasks(list(text.held_out), config.max_tasks)
    if not tasks:
        raise UserError(f"{data} has no cloze sentences in the {len(text.held_out)} texts after the first "
                        f"{config.max_tokens} tokens (the default tasks come from there); pass more text, a smaller "
                        "--max-tokens, --tasks FILE, or --tasks none")
    return tasks


def _check_task_lengths(encoded: list[EncodedTask], limit: int | None) -> None:
    for i, t in enumerate(encoded, 1):
        n = len(t.context) + max(len(c) for c in t.continuations) - 1     # positions the longest choice reaches
        if limit is not None and n > limit:
            raise UserError(f"task {i} takes {n} tokens, over the model's limit of {limit} positions; shorten its "
                            "context, or pass --tasks none")


def _modeled_tpot(name: str, plans: dict) -> float | None:
    """The plan's modeled TPOT of policy `name` (ms): a plan's own, or what the first plan predicts for `name`."""
    if name in plans:
        return plans[name].predicted["plan"]["tpot_ms"]
    first = next(iter(plans.values()), None)
    return first.predicted[name]["tpot_ms"] if first is not None and name in first.predicted else None


def _measure(rt, name: str, inputs: Inputs, reference: Reference | None, with_tasks: bool, modeled: float | None,
             config: EvalConfig, progress: bool) -> tuple[dict, Reference]:
    """The three passes over one policy: its entry of the result (agreements against `reference`; None when rt is
    resident, the reference itself), and its own outputs as a reference."""
    def bar(what: str, total: int, unit: str) -> tqdm:
        return tqdm(total=total, desc=f"{name}: {what}", unit=unit, disable=not progress)

    with bar("perplexity", len(inputs.windows), "window") as b:
        ppl: PerplexityPass = perplexity_pass(rt, inputs.windows, config.batch, b)
    stats = rt.stats.to_dict()                    # the rates are the perplexity pass's
    rt.stats.reset()
    greedy: list[list[int]] = []
    if len(inputs.prompts):
        with bar("greedy", config.gen_tokens, "token") as b:
            greedy = greedy_pass(rt, inputs.prompts, config.gen_tokens, b)
    task = None
    if with_tasks and inputs.tasks is not None:
        with bar("tasks", len(inputs.encoded), "task") as b:
            task = score(inputs.tasks, task_pass(rt, inputs.encoded, b))
    ours = Reference(ppl.argmax, greedy)
    ref = reference or ours
    entry = {
        "perplexity": math.exp(ppl.nll / ppl.count), "nll_tokens": ppl.count,
        "window_nll": [[s, c] for s, c in ppl.window_nll],
        "top1_agreement": top1_agreement(ppl.argmax, ref.argmax),
        "greedy_agreement": greedy_agreement(greedy, ref.greedy) if greedy else None,
        "greedy_tokens": config.gen_tokens,
        "task_accuracy": None if task is None else task["acc"],
        "task_accuracy_norm": None if task is None else task["acc_norm"],
        "hit_rate": stats["hit_rate"],       # exact + understudy; the five shares below add up to 1
        **{k: stats[k] for k in ("exact_hit_rate", "substitution_rate", "drop_rate", "host_rate", "miss_rate")},
        "understudies": stats["understudies"],
        "loads_per_token": stats["loads_per_token"], "bytes_per_token": stats["bytes_per_token"],
        "precision_mix": stats["precision_mix"],     # shares of computed pairs by the precision computing them
        "tpot_ms": 1e3 * ppl.seconds / max(ppl.steps, 1), "tpot_ms_modeled": modeled,
        "cache_capacity_bytes": stats["cache_capacity_bytes"]}
    return entry, ours


def _mix(mix: dict | None) -> str:
    """The precision mix as "bfloat16 0.31, int4 0.69" (shares of computed pairs); "-" when not recorded."""
    return "-" if not mix else ", ".join(f"{k} {v:.2f}" for k, v in mix.items() if v > 0 or len(mix) == 1)


def table(result: dict) -> str:
    """The result as a table: one row per policy, perplexity change vs resident with its paired 95% interval."""
    pols = result["policies"]
    w = max([9] + [len(n) for n in pols])
    t = result["tasks"]
    tasks = "no tasks" if t is None else f"{t['count']} tasks from {t['source']}"
    lines = [f"{result['tokens']} tokens in {result['windows']} windows of {result['window']}; greedy: "
             f"{result['prompts']} prompts x {result['greedy_tokens']} tokens; {tasks}",
             f"{'policy':<{w}} {'ppl':>8} {'vs ' + REFERENCE + ' % [95% CI]':>24} {'top1':>6} {'greedy':>6} "
             f"{'task':>5} {'hit':>6} {'subst':>6} {'drop':>6} {'loads/t':>8} {'MB/t':>7} {'TPOT ms':>8} "
             f"{'modeled':>8}  precision"]

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for name, r in pols.items():
        vs = "-"
        if REFERENCE in pols and name != REFERENCE:
            d, lo, hi = paired_bootstrap(result, REFERENCE, name)
            vs = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        lines.append(f"{name:<{w}} {r['perplexity']:>8.3f} {vs:>24} {r['top1_agreement']:>6.3f} "
                     f"{num(r['greedy_agreement'], '.3f'):>6} {num(r['task_accuracy'], '.2f'):>5} "
                     f"{r['hit_rate']:>6.3f} {r['substitution_rate']:>6.3f} {r['drop_rate']:>6.3f} "
                     f"{r['loads_per_token']:>8.2f} {r['bytes_per_token'] / 1e6:>7.3f} {r['tpot_ms']:>8.2f} "
                     f"{num(r['tpot_ms_modeled'], '.2f'):>8}  {_mix(r.get('precision_mix'))}")
    return "\n".join(lines)
