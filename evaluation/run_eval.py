"""`evaluate(...)`: every policy over the same tokens, in one run.

perplexity      exp(mean NLL) over every predicted token: the stream's first N tokens cut into windows of `window`
                tokens; each window predicts its tokens 2..len from the ones before. Tokens pass one step at a time with
                the KV cache (Runtime.teacher_force), so the expert cache sees what it sees when generating;
                `batch` windows run side by side as the rows of one batch.
agreement       share of greedy tokens equal to resident's, continuing prompts taken from the data.
task_accuracy   log-likelihood multiple choice (evaluation.tasks), contexts and continuations stepped the same way.
rates           from the runtime's counters over the perplexity pass (decode steps only).
tpot_ms         wall time per decode step of that pass (with --link, on the emulated link);
tpot_ms_modeled the plan's modeled TPOT for that policy on its target (needs --plan).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from artifacts.errors import UserError
from evaluation.data import prompts, token_stream, windows
from profiler.calibration import read_texts
from evaluation.tasks import load_tasks, score
from runtime.policy.config import POLICIES

DEFAULT_TASKS = Path(__file__).resolve().parents[1] / "demo" / "data" / "tasks.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    policies: tuple[str, ...] = ("resident", "lru", "smoe", "plan")
    cache: str = "25%"
    batch: int = 1
    link: str | None = None
    max_tokens: int = 2048
    window: int | None = None         # default: 512, or the model's context if shorter
    tasks: str | None = None          # default: the bundled cloze tasks
    max_tasks: int = 60
    prompts: int = 8
    prompt_len: int = 16
    gen_tokens: int = 16
    device: str = "cpu"
    dtype: str | None = None
    text_field: str = "text"


@torch.no_grad()
def _nll(rt, wins: list[np.ndarray], batch: int, bar) -> tuple[float, int, float, int]:
    """Sum of NLL and count of predicted tokens; wall seconds and decode steps."""
    total, count, seconds, steps = 0.0, 0, 0.0, 0
    for start in range(0, len(wins), batch):
        group = wins[start:start + batch]
        n = min(len(w) for w in group)           # rows of one batch step together: cut to the shortest
        ids = torch.from_numpy(np.stack([w[:n] for w in group])).to(rt.lm.device)
        t0 = time.perf_counter()
        logits = rt.teacher_force(ids)           # [B, n, V]
        seconds += time.perf_counter() - t0
        steps += n
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        total += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
        bar.update(len(group))
    return total, count, seconds, steps


@torch.no_grad()
def _task_scores(rt, tasks: list[dict]) -> dict:
    """Each context is stepped once; each choice continues from a copy of its KV cache."""
    tok = rt.tokenizer
    memo: dict[str, tuple] = {}

    def loglik(context: str, continuation: str) -> float:
        if context not in memo:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cache = DynamicCache(config=rt.lm.config)
            last = rt.teacher_force(torch.tensor([ctx], device=rt.lm.device), cache=cache)[0, -1]
            memo.clear()
            memo[context] = (ctx, cache, last)
        ctx, cache, last = memo[context]
        cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):] or \
            tok(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([cont], device=rt.lm.device)
        logits = torch.cat([last[None], rt.teacher_force(ids[:, :-1], cache=copy.deepcopy(cache))[0]]) \
            if len(cont) > 1 else last[None]
        return float(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, :, None]).sum())

    return score(tasks, loglik)


def _greedy(rt, prompt_ids: list[np.ndarray], n: int) -> list[list[int]]:
    out = []
    for p in prompt_ids:
        rt.generate("", input_ids=torch.from_numpy(p)[None].to(rt.lm.device), max_new_tokens=n)
        out.append(rt.last_tokens[0].tolist())
    return out


def evaluate(model_dir: str | Path, data: str, plan: str | Path | Mapping[str, str | Path] | None = None,
             config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """`plan`: one plan directory (policy "plan") or {policy name: plan directory} to compare several."""
    from runtime import Runtime

    plan_dirs = {} if plan is None else ({"plan": plan} if isinstance(plan, (str, Path)) else dict(plan))
    unknown = [p for p in config.policies if p not in POLICIES and p not in plan_dirs]
    if unknown:
        raise UserError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}"
                        + (f" or a plan given ({', '.join(plan_dirs)})" if plan_dirs else ""))
    missing = [p for p in config.policies if p == "plan" and p not in plan_dirs]
    if missing:
        raise UserError("policy 'plan' needs --plan PLAN_DIR (run moe-compile), or leave it out of --policies")
    if config.batch < 1 or (config.window is not None and config.window < 2) or config.max_tokens < 2:
        raise UserError("--batch must be >= 1, --window and --max-tokens >= 2")
    if config.max_tasks < 1:
        raise UserError(f"--max-tasks must be at least 1 (got {config.max_tasks})")
    from artifacts.plan import Plan
    from runtime.link import parse_link
    from runtime.policy.slots import resolve_slots
    from runtime.runtime import check_plan_matches

    plans = {name: Plan.load(path) for name, path in plan_dirs.items()}     # fail before any model work
    if config.link is not None:
        parse_link(config.link)
    if config.tasks is not None:
        load_tasks(config.tasks, config.max_tasks)
    texts, _ = read_texts(data, config.text_field)
    ref_rt = Runtime.load(model_dir, policy="resident", device=config.device, dtype=config.dtype)
    if ref_rt.tokenizer is None:
        raise UserError(f"{model_dir} has no tokenizer; evaluation needs one")
    arch = ref_rt.lm.arch
    window = config.window or min(512, arch.max_positions or 512)
    if arch.max_positions is not None and window > arch.max_positions:
        raise UserError(f"--window {window} is over the model's limit of {arch.max_positions} positions; "
                        f"use --window {arch.max_positions} or less")
    if any(p in ("lru", "smoe") for p in config.policies):
        resolve_slots(config.cache, arch.moe_layers, arch.num_experts)
    for name, path in plan_dirs.items():
        check_plan_matches(plans[name], ref_rt.lm, model_dir)
    first_plan = next(iter(plans.values()), None)
    stream = token_stream(data, ref_rt.tokenizer, config.max_tokens, config.text_field, texts)
    wins = windows(stream, window)
    tasks = load_tasks(config.tasks or DEFAULT_TASKS, config.max_tasks)
    prompt_ids = prompts(stream, config.prompts, config.prompt_len)
    reference = _greedy(ref_rt, prompt_ids, config.gen_tokens)
    ref_rt.close()

    results = {}
    for name in config.policies:
        kw = {"plan": plans[name], "policy": "plan"} if name in plans else {"policy": name}
        if name in ("lru", "smoe"):
            kw["cache"] = config.cache
        if name != "resident":
            kw["link"] = config.link
        rt = Runtime.load(model_dir, device=config.device, dtype=config.dtype, **kw)
        with rt:
            bar = tqdm(total=len(wins), desc=f"{name}: perplexity", unit="window", disable=not progress)
            nll, count, seconds, steps = _nll(rt, wins, config.batch, bar)
            bar.close()
            stats = rt.stats.to_dict()
            rt.stats.reset()
            gen = _greedy(rt, prompt_ids, config.gen_tokens)
            same = sum(int(a == b) for g, r in zip(gen, reference) for a, b in zip(g, r))
            agreement = same / max(sum(len(r) for r in reference), 1)
            task = _task_scores(rt, tasks)
        modeled = None
        if name in plans:
            modeled = plans[name].predicted["plan"]["tpot_ms"]
        elif first_plan is not None and name in first_plan.predicted:
            modeled = first_plan.predicted[name]["tpot_ms"]
        results[name] = {
            "perplexity": math.exp(nll / count), "nll_tokens": count, "agreement": agreement,
            "task_accuracy": task["acc"], "task_accuracy_norm": task["acc_norm"],
            "hit_rate": stats["hit_rate"], "substitution_rate": stats["substitution_rate"],
            "drop_rate": stats["drop_rate"], "host_rate": stats["host_rate"],
            "understudies": stats["understudies"],
            "loads_per_token": stats["loads_per_token"], "bytes_per_token": stats["bytes_per_token"],
            "tpot_ms": 1e3 * seconds / max(steps, 1), "tpot_ms_modeled": modeled,
            "cache_capacity_bytes": stats["cache_capacity_bytes"]}
    return {"model": str(model_dir), "data": str(data), "tokens": int(len(stream)), "windows": len(wins),
            "window": window,
            "batch": config.batch, "link": config.link, "cache": config.cache,
            "plan": str(plan_dirs["plan"]) if "plan" in plan_dirs else None,
            "plans": {k: str(v) for k, v in plan_dirs.items()},
            "policies": results}


def table(result: dict) -> str:
    lines = [f"{'policy':<9} {'ppl':>8} {'agree':>6} {'task':>5} {'hit':>6} {'subst':>6} {'drop':>6} "
             f"{'loads/t':>8} {'TPOT ms':>8} {'modeled':>8}"]
    for name, r in result["policies"].items():
        m = "-" if r["tpot_ms_modeled"] is None else f"{r['tpot_ms_modeled']:.2f}"
        lines.append(f"{name:<9} {r['perplexity']:>8.3f} {r['agreement']:>6.3f} {r['task_accuracy']:>5.2f} "
                     f"{r['hit_rate']:>6.3f} {r['substitution_rate']:>6.3f} {r['drop_rate']:>6.3f} "
                     f"{r['loads_per_token']:>8.2f} {r['tpot_ms']:>8.2f} {m:>8}")
    return "\n".join(lines)
