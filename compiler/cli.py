"""moe-compile: a profile + a memory budget + a hardware target -> a plan (substitution map + cache plan).

  moe-compile PROFILE_DIR --budget SIZE|PCT|auto -o PLAN_DIR [--target NAME|FILE] [--tpot-target MS | --max-error E]
              [--batch B] [--context T] [--headroom SIZE|PCT] [--precision auto|off|int8|int4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifacts.errors import check_range, cli_parser, run_cli

PROG = "moe-compile"


def _parser() -> argparse.ArgumentParser:
    from compiler.compile_plan import CompileConfig
    from compiler.targets import presets

    d = CompileConfig()
    ap = cli_parser(PROG, "Compile a profile into a plan for a memory budget and target.")
    ap.add_argument("profile_dir")
    ap.add_argument("--budget", required=True,
                    help="all device memory the runtime may use (12GiB, 900MiB), the cache's share of routed-expert "
                         "bytes (25%%), or auto: the target device's free memory on this machine (CUDA: free GPU "
                         "memory; CPU: available RAM) minus --headroom, printed with how it was derived")
    ap.add_argument("--headroom", default=None, metavar="SIZE|PCT",
                    help="with --budget auto: free memory to leave unused (2GiB, or 15%% of free); "
                         "default 10%% of free, at least 1 GiB")
    ap.add_argument("-o", "--output", required=True, help="plan directory to write")
    ap.add_argument("--target", default=d.target, help=f"preset ({', '.join(presets())}) or a YAML file")
    goal = ap.add_mutually_exclusive_group()
    goal.add_argument("--tpot-target", type=float, default=None, metavar="MS",
                      help="time per output token to meet on the target, with the least predicted error")
    goal.add_argument("--max-error", type=float, default=None, metavar="E",
                      help="largest predicted perplexity increase (0.01 = +1%%; at the upper end of its 95%% "
                           "interval where the profile kept per-window measurements; without a measured loss "
                           "sensitivity in the profile: share of routed output mass replaced by error), with the "
                           "most hits; default: the least TPOT within +0.5%%")
    ap.add_argument("--precision", choices=("auto", "off", "int8", "int4"), default=d.precision,
                    help="precision the cache holds experts at: auto (default) lets the plan hold less important "
                         "experts as int8 or int4 copies where the profile's measured cost allows (needs moe-profile "
                         "--quant-tokens > 0; else the checkpoint's format); off: the checkpoint's format only; "
                         "int8: int8 at the lowest")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--context", type=int, default=d.context, help="tokens of KV cache to reserve per sequence")
    ap.add_argument("--search-tokens", type=int, default=d.search_tokens, help="trace tokens per search candidate")
    ap.add_argument("--no-report", action="store_true", help="skip report.md and its plots")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


def _run(args) -> int:
    from artifacts.atomic import check_output_dir
    from compiler.compile_plan import CompileConfig, compile_plan
    from compiler.summary import summarize

    out = check_output_dir(args.output, "plan.json", "plan")
    check_range(args.batch, "--batch", 1)
    check_range(args.context, "--context", 1)
    check_range(args.search_tokens, "--search-tokens", 1)
    if args.max_error is not None:
        check_range(args.max_error, "--max-error", 0.0)
    if args.tpot_target is not None:
        check_range(args.tpot_target, "--tpot-target", 0.0, lo_open=True)
    cfg = CompileConfig(budget=args.budget, target=args.target, tpot_target_ms=args.tpot_target,
                        max_error=args.max_error, batch=args.batch, context=args.context,
                        search_tokens=args.search_tokens, headroom=args.headroom, precision=args.precision)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    plan = compile_plan(args.profile_dir, cfg, log=log)
    extras = None
    if not args.no_report:
        from compiler.report import write_report

        def extras(tmp: Path) -> None:          # report and plots join the plan in one atomic swap
            write_report(plan, args.profile_dir, tmp)
    plan.save(out, extras=extras)
    if not args.quiet:
        print(summarize(plan))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
