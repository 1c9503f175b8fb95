"""moe-run: decode with routed experts offloaded, a bounded expert cache and understudies.

  moe-run MODEL_DIR [--plan PLAN_DIR] [--policy P] [--cache N|PCT] [--link BW[,LAT]] --prompt TEXT [--prompt ...]
          [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--lossless] [--stats-json F]
"""
from __future__ import annotations

import argparse
import json
import sys

from artifacts.errors import cli_parser, run_cli
from runtime.config import DEFAULT_MAX_NEW_TOKENS, RunConfig, SamplingConfig

PROG = "moe-run"


def _parser() -> argparse.ArgumentParser:
    from runtime.policy.config import POLICIES

    ap = cli_parser(PROG, "Decode with a MoE checkpoint whose routed experts are "
                                 "offloaded; a bounded device cache; understudies for low-importance misses.")
    ap.add_argument("model_dir")
    ap.add_argument("--plan", default=None, help="plan directory from moe-compile (policy 'plan')")
    ap.add_argument("--policy", choices=POLICIES, default=None,
                    help="resident | lru | smoe | plan (default: plan with --plan, else smoe)")
    ap.add_argument("--cache", default=None, help="slots per MoE layer (8) or share of routed-expert bytes (25%%)")
    ap.add_argument("--link", default=None, help="emulated host-to-device link, e.g. 50MB/s,20us")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=None, help="score band for understudies (smoe/plan)")
    ap.add_argument("--lossless", action="store_true", help="no understudies, no drops: exact outputs")
    ap.add_argument("--host-compute", choices=("on", "off"), default=None,
                    help="compute low-score misses on the host when cheaper than loading (default: on with cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--store", choices=("auto", "mmap", "host"), default="auto",
                    help="where offloaded experts live: the mmap'd checkpoint or host memory (auto: host on cuda)")
    ap.add_argument("--stats-json", default=None, help="write run statistics here")
    ap.add_argument("--per-layer", action="store_true", help="per-layer breakdown in the statistics")
    ap.add_argument("--quiet", action="store_true", help="no statistics summary on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


def _run(args) -> int:
    from runtime.runtime import Runtime

    from artifacts.atomic import atomic_write_text, check_output_file

    config = RunConfig(policy=args.policy, plan=args.plan, cache=args.cache, lossless=args.lossless, link=args.link,
                       device=args.device, dtype=args.dtype, store=args.store, alpha=args.alpha,
                       host_compute=None if args.host_compute is None else args.host_compute == "on",
                       sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                               top_p=args.top_p, seed=args.seed)).checked()
    if args.stats_json:
        check_output_file(args.stats_json, "--stats-json")
    rt = Runtime.load(args.model_dir, config)
    with rt:
        if not args.quiet and rt.budget is not None:
            print(rt.budget.describe(), file=sys.stderr)
        stream = len(args.prompt) == 1 and rt.tokenizer is not None
        if stream:
            sys.stdout.write(args.prompt[0])
            sys.stdout.flush()
            ids: list[int] = []
            shown = [""]

            def on_step(tokens):
                tok = int(tokens[0])
                if tok == rt.eos_id:
                    return
                ids.append(tok)
                text = rt.tokenizer.decode(ids, skip_special_tokens=True)
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text
        else:
            on_step = None
        texts = rt.generate(args.prompt, on_step=on_step)
        if stream:
            sys.stdout.write("\n")
        else:
            for p, t in zip(args.prompt, texts):
                print(p + t)
        if not args.quiet:
            print(rt.stats.summary(), file=sys.stderr)
        if args.stats_json:
            atomic_write_text(args.stats_json, json.dumps(rt.stats.to_dict(per_layer=args.per_layer), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
