"""moe-profile: measure a MoE model's experts on calibration text; write a versioned profile directory.

  moe-profile MODEL_DIR --calib DATA -o PROFILE_DIR [--samples N] [--seq-len L] [--seed S] [--text-field F]
              [--device cpu|cuda] [--probe-tokens P] [--sensitivity-tokens S] [--quant-tokens Q]
  moe-profile merge A B [C ...] -o OUT
  torchrun --nproc_per_node W -m profiler.cli MODEL_DIR --calib DATA -o PROFILE_DIR ...   (sharded: W processes)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifacts.errors import check_range, cli_parser, run_cli

PROG = "moe-profile"


def _check_output(path: str) -> Path:
    from artifacts.atomic import check_output_dir

    return check_output_dir(path, "profile.json", "profile")


def _profile_parser() -> argparse.ArgumentParser:
    from profiler.profile_model import ProfileConfig
    from profiler.quant_sensitivity import CLASSES
    from runtime.quantize import SCHEMES

    d = ProfileConfig()
    ap = cli_parser(PROG, "Profile a Mixture-of-Experts checkpoint on calibration text "
                                 "(use 'moe-profile merge A B -o C' to merge profiles of calibration shards).")
    ap.add_argument("model_dir", help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--calib", required=True, help=".jsonl/.txt/.parquet file, a saved datasets directory, or a hub name")
    ap.add_argument("-o", "--output", required=True, help="profile directory to write")
    ap.add_argument("--samples", type=int, default=d.samples, help=f"calibration windows (default {d.samples})")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default 256, or the model's context if shorter)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--text-field", default=d.text_field, help="field of .jsonl/.parquet/dataset rows with the text")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="compute dtype (default: float32 on cpu, the checkpoint's on cuda)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass")
    ap.add_argument("--probe-tokens", type=int, default=d.probe_tokens,
                    help=f"tokens on which every expert runs, for similarity (default {d.probe_tokens})")
    ap.add_argument("--sensitivity-tokens", type=int, default=d.sensitivity_tokens,
                    help="calibration tokens on which the loss cost of substitutions is measured "
                         f"(0: skip; the compiler then judges understudies by output error; default {d.sensitivity_tokens})")
    ap.add_argument("--quant-tokens", type=int, default=d.quant_tokens,
                    help="calibration tokens on which the loss cost of quantizing experts is measured: 1 + MoE layers "
                         f"x {len(CLASSES)} importance classes x {len(SCHEMES)} schemes "
                         f"({', '.join(s.name for s in SCHEMES)}) forward passes over them "
                         f"(0: skip; default {d.quant_tokens})")
    ap.add_argument("--trace-extra", type=int, default=None, help="experts traced beyond the top k (default k)")
    ap.add_argument("--cluster-threshold", type=float, default=d.cluster_threshold,
                    help="distance (1 - cosine) at which functional groups are cut")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return ap


def _run_profile(argv: list[str]) -> int:
    from profiler.distributed import ShardFailed, torchrun_shards
    from profiler.profile_model import ProfileConfig, profile
    from profiler.summary import summarize

    args = _profile_parser().parse_args(argv)
    out = _check_output(args.output)
    check_range(args.samples, "--samples", 1)
    if args.seq_len is not None:
        check_range(args.seq_len, "--seq-len", 2)
    check_range(args.batch_size, "--batch-size", 1)
    check_range(args.probe_tokens, "--probe-tokens", 0)
    check_range(args.sensitivity_tokens, "--sensitivity-tokens", 0)
    check_range(args.quant_tokens, "--quant-tokens", 0)
    check_range(args.cluster_threshold, "--cluster-threshold", 0.0, 2.0)
    if args.trace_extra is not None:
        check_range(args.trace_extra, "--trace-extra", 0)
    cfg = ProfileConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed, text_field=args.text_field,
                        device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        probe_tokens=args.probe_tokens, trace_extra=args.trace_extra,
                        sensitivity_tokens=args.sensitivity_tokens, quant_tokens=args.quant_tokens,
                        cluster_threshold=args.cluster_threshold, tokenizer=args.tokenizer)
    try:
        with torchrun_shards(args.device) as shards:
            prof = profile(args.model_dir, args.calib, cfg, progress=not args.quiet, shards=shards)
            shards.agree(lambda: prof.save(out) if shards.main else None)      # rank 0 writes; all hear how it went
    except ShardFailed as exc:
        if exc.quiet:                                                         # rank 0 says what failed where
            return 2
        raise
    if shards.main:
        if not args.quiet:
            print(summarize(prof))
        print(f"wrote {out}")
    return 0


def _run_merge(argv: list[str]) -> int:
    from artifacts.profile import Profile
    from profiler.merge import merge_profiles
    from profiler.summary import summarize

    ap = cli_parser(f"{PROG} merge", "Merge profiles of calibration shards of one model.")
    ap.add_argument("profiles", nargs="+", help="profile directories")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = _check_output(args.output)
    merged = merge_profiles([Profile.load(p) for p in args.profiles])
    merged.save(out)
    if not args.quiet:
        print(summarize(merged))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return run_cli(PROG, lambda: _run_merge(argv[1:]))
    return run_cli(PROG, lambda: _run_profile(argv))


if __name__ == "__main__":
    sys.exit(main())
