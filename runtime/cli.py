"""moe-run: decode with routed experts offloaded, a bounded expert cache and understudies.

  moe-run MODEL_DIR [--plan PLAN_DIR] [--policy P] [--cache N|PCT] [--profile PROFILE_DIR] [--link BW[,LAT]]
          (--prompt TEXT [--prompt ...] | --prompts-file F | --chat [--chat-template FILE|chatml])
          [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--repetition-penalty R] [--stop S]
          [--seed S] [--lossless] [--stats-json F]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from artifacts.errors import UserError, cli_parser, run_cli
from runtime.config import DEFAULT_MAX_NEW_TOKENS, RunConfig, SamplingConfig

PROG = "moe-run"


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options of a run (RunConfig), shared by moe-run and moe-serve."""
    from runtime.policy.config import POLICIES

    ap.add_argument("model_dir")
    ap.add_argument("--plan", default=None, help="plan directory from moe-compile (policy 'plan')")
    ap.add_argument("--policy", default=None,
                    help=f"{' | '.join(POLICIES)} (default: plan with --plan, else smoe)")
    ap.add_argument("--cache", default=None, help="slots per MoE layer (8) or share of routed-expert bytes (25%%)")
    ap.add_argument("--profile", default=None, metavar="PROFILE_DIR",
                    help="policy static: the profile whose most frequently routed experts it pins (moe-profile's "
                         "output for this model)")
    ap.add_argument("--link", default=None, help="emulated host-to-device link, e.g. 50MB/s,20us")
    ap.add_argument("--alpha", type=float, default=None, help="score band for understudies (smoe/plan)")
    ap.add_argument("--lossless", action="store_true", help="no understudies, no drops: exact outputs")
    ap.add_argument("--host-compute", choices=("on", "off"), default=None,
                    help="compute low-score misses on the host when cheaper than loading (default: on with cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--store", choices=("auto", "mmap", "host"), default="auto",
                    help="where offloaded experts live: the mmap'd checkpoint or host memory (auto: host on cuda)")
    ap.add_argument("--chat-template", default=None,
                    help="Jinja chat template file, or 'chatml' (default: the tokenizer's own)")


def run_config(args, sampling: SamplingConfig | None = None) -> RunConfig:
    """The RunConfig of parsed run options, checked (before any model work)."""
    from runtime.chat import load_template

    load_template(args.chat_template)   # a bad --chat-template fails here, before the model loads
    return RunConfig(policy=args.policy, plan=args.plan, cache=args.cache, profile=args.profile,
                     lossless=args.lossless, link=args.link,
                     device=args.device, dtype=args.dtype, store=args.store, alpha=args.alpha,
                     host_compute=None if args.host_compute is None else args.host_compute == "on",
                     sampling=sampling or SamplingConfig()).checked()


def _parser() -> argparse.ArgumentParser:
    ap = cli_parser(PROG, "Decode with a MoE checkpoint whose routed experts are "
                                 "offloaded; a bounded device cache; understudies for low-importance misses.")
    add_run_options(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch (\\n and \\t are escapes)")
    src.add_argument("--prompts-file", default=None, help="prompts, one per line (- for stdin); decoded as a batch")
    src.add_argument("--chat", action="store_true",
                     help="interactive chat with the chat template, streamed; /stats shows the cache figures")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}; --chat: 256)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    ap.add_argument("--stop", action="append", default=[], help="a stop string; repeat for more")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-json", default=None, help="write run statistics here")
    ap.add_argument("--per-layer", action="store_true", help="per-layer breakdown in the statistics")
    ap.add_argument("--quiet", action="store_true", help="no statistics summary on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


def _unescape(text: str) -> str:
    """A prompt typed on a command line: \\n, \\t and \\\\ mean newline, tab and backslash."""
    return re.sub(r"\\\\|\\n|\\t", lambda m: {"\\\\": "\\", "\\n": "\n", "\\t": "\t"}[m.group()], text)


def _prompts(args) -> list[str]:
    if args.prompt:
        return [_unescape(p) for p in args.prompt]
    try:
        text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompts-file {args.prompts_file}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts-file {args.prompts_file} is not UTF-8 text") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {args.prompts_file} has no prompts (one per line)")
    return prompts


def _run(args) -> int:
    from runtime.runtime import Runtime

    from artifacts.atomic import atomic_write_text, check_output_file

    n = args.max_new_tokens if args.max_new_tokens is not None else 256 if args.chat else DEFAULT_MAX_NEW_TOKENS
    sampling = SamplingConfig(max_new_tokens=n,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              repetition_penalty=args.repetition_penalty, stop=tuple(args.stop))
    config = run_config(args, sampling)
    prompts = None if args.chat else _prompts(args)
    if args.chat:   # before the model loads: can this model chat at all?
        from runtime.chat import has_template, load_template
        from runtime.model_loader import load_tokenizer

        if not has_template(load_tokenizer(args.model_dir), load_template(args.chat_template)):
            raise UserError("this model has no chat template; pass --chat-template FILE (or chatml)")
    if args.stats_json:
        check_output_file(args.stats_json, "--stats-json")
    rt = Runtime.load(args.model_dir, config)
    with rt:
        if not args.quiet and rt.budget is not None:
            print(rt.budget.describe(), file=sys.stderr)
        if args.chat:
            from runtime.chat_cli import chat_loop

            chat_loop(rt, args.chat_template)
        elif len(prompts) == 1 and rt.tokenizer is not None:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()
            for text in rt.stream(prompts[0]):
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for p, t in zip(prompts, rt.generate(prompts)):
                print(p + t)
        if not args.quiet:
            print(rt.stats.summary(), file=sys.stderr)
        if args.stats_json:
            atomic_write_text(args.stats_json, json.dumps(rt.stats.to_dict(per_layer=args.per_layer), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
