"""Benchmark: what one cache decision costs, per policy, replayed on recorded routing (no model between calls).

    python benchmarks/decisions.py            # markdown on stdout
    python benchmarks/decisions.py --write    # and the section "decisions" of docs/BENCHMARKS.md

The runtime's own time per MoE layer call (benchmarks/overhead.py) is measured inside a decoding model, where this
2-core machine's noise is larger than the differences sought. This script isolates its decision part: the routing
of greedy decodes of the random-weight Qwen3-30B-A3B-shaped model of overhead.py (48 MoE layers, 128 experts, top-8)
is recorded once (per layer call: the chosen experts, every expert's score, and the next layer's router on the same
input, which prefetch reads), then replayed through a fresh cache model of each policy at 50% of the experts per
layer, as the runtime makes it (`make_cache_model`: the fast model for lossless lru/lfu/lfru, the compiled model for
smoe), and through the reference `CacheModel` as well (same decisions: tests/runtime/test_fast_path.py and
test_lean_model.py). Inputs are what each model takes from the executor: arrays for the fast one (the score table read
only when it asks), the router's arrays for the compiled one (chosen and score table, for the call and for the next
layer's prediction: views, as `call_arrays` gives them on the CPU), per-token top-2k score dicts for the reference (their
making, `score_rows`, timed with it). The prediction itself, the next layer's router applied to the call's
input (what prefetching policies compute before deciding), is timed apart, over the recorded inputs.
Per cell: the fastest of `REPEATS` replays of every decode call (the cells taking turns, so that a slow spell of
the machine does not fall on one cell's replays only), in microseconds per layer call. Without torch ops
between calls the caches stay warm, so the cost inside a decode is higher; the ratios between policies are the point.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Cache decisions per layer call, replayed (random-weight Qwen3-30B-A3B shape)"
POLICIES = ("lru", "lfu", "lfru", "smoe")
REPEATS = 5
TOKENS, PROMPT = 32, 16


def record(model_dir: Path, batch: int, seed: int = 0) -> tuple[list[tuple], dict[int, int], int, int, float]:
    """(calls, slots, E, k, predict_s): per decode layer call in order (layer, routing, next layer's routing or
    None), the 50% slots per MoE layer, and the seconds per layer call of the prediction that prefetch reads (the
    next layer's router on the call's input, `next_layer_router`: its logits, softmax and top-k), the fastest of
    `REPEATS` passes over the recorded inputs."""
    from runtime import Runtime
    from runtime.model_loader import next_layer_router

    calls: list[tuple] = []
    with Runtime.load(model_dir, policy="resident") as rt:
        nxt = next_layer_router(rt.lm)
        ex = rt.executor

        inputs: list[tuple[int, torch.Tensor]] = []

        def tap(layer, x, routing):
            if x.shape[0] == batch:              # decode steps (the prompt's call has batch x PROMPT rows)
                calls.append((layer, routing, nxt(layer, x)))
                inputs.append((layer, x.clone()))
            return ex(layer, x, routing)

        for block in rt.lm.blocks.values():
            block.executor = tap
        ids = torch.randint(3, 260, (batch, PROMPT), generator=torch.Generator().manual_seed(seed + batch))
        rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=TOKENS)
        slots = {l: rt.lm.arch.num_experts // 2 for l in rt.lm.arch.moe_layers}
        e, k = rt.lm.arch.num_experts, rt.lm.arch.top_k
        predict_s = float("inf")
        with torch.no_grad():
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                for layer, x in inputs:
                    nxt(layer, x)
                predict_s = min(predict_s, (time.perf_counter() - t0) / len(inputs))
    return calls, slots, e, k, predict_s


def replay(calls, slots, e, k, policy: str, reference: bool) -> float:
    """Seconds per layer call of one replay of every call through a fresh model."""
    from runtime.router import score_rows
    from runtime.policy.config import preset
    from runtime.policy.fast import make_cache_model
    from runtime.policy.plan_params import substitution_params
    from runtime.policy.schedule import CacheModel

    pol = preset(policy, host_compute=False)
    params = substitution_params(pol, list(slots))
    width = 2 * k
    model = (CacheModel(slots, e, k, pol, params) if reference else make_cache_model(slots, e, k, pol, params))
    lean, compiled = hasattr(model, "schedule_arrays"), hasattr(model, "schedule_table")
    t0 = time.perf_counter()
    for layer, routing, nxt in calls:
        if lean:
            model.schedule_arrays(layer, routing.idx.numpy(), table=lambda r=routing: r.score.numpy())
        elif compiled:
            p = nxt[1] if nxt is not None and pol.prefetch else None
            model.schedule_table(layer, routing.idx.numpy(), routing.score.numpy(), width,
                                 (p.idx.numpy(), p.score.numpy()) if p is not None else None)
        else:
            rows, chosen = score_rows(routing, width)
            pred = score_rows(nxt[1], width)[0] if pol.prefetch and nxt is not None else None
            model.schedule(layer, rows, chosen, pred)
    return (time.perf_counter() - t0) / len(calls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import SHAPES, OverheadConfig, build_model
    from run_benchmarks import git_commit, machine
    from sections import write_section

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    shape = next(s for s in SHAPES if s.key == "qwen3-30b-a3b")
    model_dir = build_model(shape, OverheadConfig())
    rows, predict = [], {}
    for batch in (1, 3):
        calls, slots, e, k, predict[batch] = record(model_dir, batch)
        best = {(p, ref): float("inf") for p in POLICIES for ref in (False, True)}
        for _ in range(REPEATS):                  # round robin: a slow spell of the machine hits every cell alike
            for p, ref in best:
                best[(p, ref)] = min(best[(p, ref)], replay(calls, slots, e, k, p, reference=ref))
        for p in POLICIES:
            rows.append((batch, p, len(calls), 1e6 * best[(p, False)], 1e6 * best[(p, True)]))
    lines = [f"Made by `python benchmarks/decisions.py` at commit {git_commit() or 'unknown'} on "
             f"{machine()['summary']}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{time.perf_counter() - t0:.0f} s. Routing of greedy decodes of {TOKENS} tokens after a {PROMPT}-token "
             "random prompt per row, replayed through each policy's cache model at 50% of the experts per layer; "
             f"the fastest of {REPEATS} replays, the cells taking turns (method: the script's docstring).", "",
             "| batch | policy | layer calls | as the runtime decides, us / call | reference CacheModel, us / call | "
             "reference / runtime |", "|---|---|---|---|---|---|"]
    for batch, p, n, run_us, ref_us in rows:
        lines.append(f"| {batch} | {p} | {n} | {run_us:.1f} | {ref_us:.1f} | {ref_us / run_us:.1f}x |")
    lines.append("")
    for batch in (1, 3):
        cells = {p: (r, f) for b, p, _, r, f in rows if b == batch}
        fastest = min(cells, key=lambda p: cells[p][0])
        lines.append(f"- Batch {batch}: the runtime decides a layer call in {min(c[0] for c in cells.values()):.1f} "
                     f"({fastest}) to {max(c[0] for c in cells.values()):.1f} us ("
                     + ", ".join(f"{p} {c[0]:.1f}" for p, c in cells.items())
                     + "); the runtime's models take "
                     + ", ".join(f"{p}'s decisions {c[1] / c[0]:.1f}x faster" for p, c in cells.items())
                     + f" than the reference model; smoe (substitution, score window, prefetch) takes "
                     f"{cells['smoe'][0] / cells['lru'][0]:.1f}x lru's time. Its prefetch also reads a prediction, "
                     f"the next layer's router on the call's input, outside the decision timed here: "
                     f"{1e6 * predict[batch]:.1f} us per layer call computed apart, as here (the runtime computes "
                     "it in the layer's own router matmul, runtime.moe_block, for less: the overhead section).")
    text = "\n".join(lines)
    print(f"{HEADING}\n\n{text}")
    if args.write:
        write_section(str(ROOT / "docs" / "BENCHMARKS.md"), "decisions", HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
