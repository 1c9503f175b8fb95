"""moe-eval: perplexity, agreement with resident, task accuracy, hit/substitution/drop rates, loads and TPOT per
policy, over the same tokens in one run.

  moe-eval MODEL_DIR --data FILE [--plan PLAN_DIR] [--plan NAME=PLAN_DIR ...] [--policies resident,lru,smoe,plan]
           [--cache PCT] [--profile PROFILE_DIR] [--batch B] [--link BW[,LAT]] [--max-tokens N] [--window W]
           [--tasks FILE|none] [--max-tasks N] [--threads N] --json OUT
--profile PROFILE_DIR is what policy static needs (it pins each layer's most frequently routed experts).
A plan given as NAME=DIR is evaluated as policy NAME (so two plans, say for two objectives, compare in one run).
resident always runs first: it is the reference of top1_agreement (teacher-forced) and greedy_agreement.
By default the tasks are cloze questions built from the texts of --data that the perplexity stream does not reach.
"""
from __future__ import annotations

import json
import sys

from artifacts.errors import cli_parser, run_cli

PROG = "moe-eval"


def main(argv: list[str] | None = None) -> int:
    from evaluation.run_eval import EvalConfig

    d = EvalConfig()
    ap = cli_parser(PROG, __doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True, help=".jsonl/.txt file or a datasets directory")
    ap.add_argument("--plan", action="append", default=None, metavar="[NAME=]PLAN_DIR",
                    help="a compiled plan, evaluated as policy 'plan' (or NAME); repeat for several")
    ap.add_argument("--policies", default=None,
                    help="comma-separated, of resident, lru, lfu, lfru, static, smoe, plan and each plan's NAME "
                         "(default: resident,lru,smoe and each plan given)")
    ap.add_argument("--cache", default=d.cache,
                    help="cache for the policies without a plan: slots per layer or share (25%%)")
    ap.add_argument("--profile", default=None, metavar="PROFILE_DIR",
                    help="policy static: the profile whose most frequently routed experts it pins")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--link", default=None, help="emulated link, e.g. 50MB/s,20us")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--window", type=int, default=d.window, help="tokens per perplexity window (default: 512, or "
                    "the model's context if shorter)")
    ap.add_argument("--tasks", default=d.tasks, metavar="FILE|none",
                    help="multiple-choice .jsonl, or none to skip tasks (default: cloze tasks built from the texts "
                         "of --data after the first --max-tokens tokens)")
    ap.add_argument("--max-tasks", type=int, default=d.max_tasks)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="torch compute threads (default: %(default)s; the loader thread takes another core)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--json", required=True, dest="json_out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


def _run(args) -> int:
    from artifacts.atomic import atomic_write_text, check_output_file
    from evaluation.run_eval import EvalConfig, evaluate, table

    check_output_file(args.json_out, "--json")
    plans = parse_plans(args.plan or [])
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else (
        ("resident", "lru", "smoe") + tuple(plans))
    cfg = EvalConfig(policies=policies, cache=args.cache, profile=args.profile, batch=args.batch, link=args.link,
                     max_tokens=args.max_tokens, window=args.window, tasks=args.tasks, max_tasks=args.max_tasks,
                     device=args.device, dtype=args.dtype, threads=args.threads)
    result = evaluate(args.model_dir, args.data, plans or None, cfg, progress=not args.quiet)
    atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def parse_plans(values: list[str]) -> dict[str, str]:
    """["DIR", "fast=DIR2"] -> {"plan": "DIR", "fast": "DIR2"}."""
    from artifacts.errors import UserError
    from runtime.policy.config import POLICIES, SIMULATED_ONLY

    taken = [p for p in POLICIES + SIMULATED_ONLY if p != "plan"]
    plans: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name.strip(), path) if sep else ("plan", v)
        if not name or name in taken:
            raise UserError(f"--plan {v!r}: a plan's name must be new (not {', '.join(taken)}); write NAME=PLAN_DIR")
        if name in plans:
            raise UserError(f"--plan: two plans named {name!r}; name them apart with NAME=PLAN_DIR")
        plans[name] = path
    return plans


if __name__ == "__main__":
    sys.exit(main())
