"""Benchmark: the runtime's own time per MoE layer call, on random-weight models with the shapes of real MoEs.

    python benchmarks/overhead.py            # every model, policy and batch; markdown on stdout
    python benchmarks/overhead.py --write    # and the section "overhead" of docs/BENCHMARKS.md
    python benchmarks/overhead.py --quick    # smoke run, ~1 min (4 decoder layers, 16 tokens, 2 repeats; not with --write)
    python benchmarks/overhead.py --models qwen3-30b-a3b   # a subset of SHAPES
    python benchmarks/overhead.py --from-json --write      # the text again from the last run's figures (its json)

Models (built once into out/benchmarks/overhead-models, random weights saved in bf16 as the real checkpoints ship
theirs): the real decoder-layer counts, expert counts, top-k, shared experts and routing rules of Mixtral-8x7B,
Qwen3-30B-A3B and DeepSeek-V2-Lite (`SHAPES`), with hidden size 64, expert intermediate size 32, 4 attention heads
and a 260-token vocabulary, so that an expert computes in microseconds and the runtime's own work per layer shows.

Per (model, batch, policy): `Runtime.load(model, policy=..., cache="50%")` (no emulated link: a load is a copy from
the mmap'd checkpoint, made inline on the compute thread for these small experts, runtime.loader), one untimed
warm-up decode, then `repeats` greedy decodes of `tokens` tokens after a random `prompt`-token prompt per row, the
policies and HF transformers' own `generate` on the same checkpoint interleaved step by step within each repeat
(`Turns`: each decode on a thread of its own, one running at a time, handing the turn on at each new token), with
the loaded objects frozen out of the garbage collector (`freeze_loaded`: a full collection over a process holding
several models takes hundreds of ms and would land on one policy's step; the section prints what it took). A
decode of n tokens has n - 1 timed steps (the first token, the prefill, is left out); over them, with L MoE layers
and c = (n - 1) x L MoE layer calls:

    T  = wall time of the steps (each from the moment the decode has the turn again to its next token's `on_step`)
    E  = time inside the expert function f_e (the GLU), summed over every expert computed
    S  = time the compute thread waited for a load to land (the executor's `stall_s`)
    C  = time the compute thread spent copying experts inline (the runtime's `copy_s`: the link's work, done on the
         compute thread where there is no link; 0 when the loader thread copies)
    X  = time inside the MoE blocks' executor calls (the block routes before the call; shared experts after it)
    P  = time inside the prediction a prefetching policy reads (the executor's `next_router`: the next MoE layer's
         router on the call's input), part of X's own time; reported apart
    R  = time inside the MoE blocks' routers (`MoEBlock.route`, and `route_paired`, where a substituting policy that
         prefetches routes and predicts the next layer in one matmul, runtime.moe_block): the layer's routing and any
         prediction; R(policy) - R(resident) is what the prediction costs, paired or not; reported apart
    own per MoE layer call            = (T - E - S - C) / c   everything but expert compute and the link (waits and
                                                              inline copies): attention, norms, routers, sampling,
                                                              and the executor's own work
    executor own per MoE layer call   = (X - E - S - C) / c   decisions, bookkeeping, row gathers, mixing, load issue
    overhead over resident            = own(policy) - own(resident)   (same model, batch and prompts)
    load per MoE layer call           = C / c inline; on the loader thread loads x mean copy time / c (its "load"
                                        events, t_end - t_start; it overlaps compute: only its waits S are
                                        subtracted)
    loads per token                   = loads / (rows x (n - 1))

E and X come from wrapping the loaded Runtime's `executor.expert_fn` (and `grouped_fn`, the grouped call a layer call
of several tokens makes: over all experts for resident, over the cache slots for the offloading policies) and each
MoE block's `executor` (public
attributes of our own objects; nothing in torch or transformers is touched); S and C are the runtime's own
statistics. Only the loader-thread row records events (`record_events=True`), for its copy times: the policies are
timed as a user runs them. A cell's figures come from the repeat with the median step time; a comparison of two
cells (over resident, x HF) pairs their steps (step n of repeat r of each ran next to the other's) and is reported as
the mean over the paired steps with a 95% paired-bootstrap interval (`compare`): on this 2-core machine the speed of
one decode moves by more than the goals within minutes (runs that took turns decode by decode spread over 2-3x), and
only steps taken next to each other see the same machine.
HF generate is timed by a stopping criterion that ends each step at its new token (`hf_decode`): its step time only.
Goals (issue #13, `goals`): over resident <= 50 us per MoE layer call at batch 1 and <= 100 us at batch 3 on the
Qwen3-30B-A3B shape; resident's step time <= 1.05x HF generate's on every shape. A goal is met when the whole
interval meets it, missed when none of it does, else not resolved (`verdict`).
`plan` and `static` are not run: both need a profile of calibration text (`moe-profile`), which a random model lacks.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "out" / "benchmarks" / "overhead-models"
HEADING = "## Runtime overhead per MoE layer (random-weight models with real shapes)"
ISSUE_RANGE_MS = (0.15, 0.4)   # issue #13: lru and smoe over resident per MoE layer, Qwen3-30B-A3B shape, batch 1


@dataclass(frozen=True)
class Shape:
    """What a benchmark model keeps of a real MoE: its layer, expert and routing structure."""

    key: str                 # name in tables and on disk
    real: str                # the model whose shape it is
    model_type: str
    layers: int              # decoder layers (the real count)
    experts: int             # routed experts per MoE layer
    top_k: int
    first_dense: int = 0     # leading dense layers (DeepSeek's first_k_dense_replace)
    shared: int = 0          # shared experts per MoE layer


SHAPES = (Shape("mixtral-8x7b", "Mixtral-8x7B", "mixtral", 32, 8, 2),
          Shape("qwen3-30b-a3b", "Qwen3-30B-A3B", "qwen3_moe", 48, 128, 8),
          Shape("deepseek-v2-lite", "DeepSeek-V2-Lite", "deepseek_v2", 27, 64, 6, first_dense=1, shared=2))


@dataclass(frozen=True)
class OverheadConfig:
    models: tuple[str, ...] = tuple(s.key for s in SHAPES)
    policies: tuple[str, ...] = ("resident", "lru", "lfu", "lfru", "smoe")   # resident first: the reference
    thread_variant: bool = True  # also lru with every copy on the loader thread (`THREAD`): what inline copies save
    batches: tuple[int, ...] = (1, 3)
    cache: str = "50%"
    tokens: int = 32            # new tokens per timed decode (tokens - 1 timed steps)
    prompt: int = 16            # prompt tokens per row
    warmup: int = 8             # new tokens of the untimed warm-up decode
    repeats: int = 5
    hf: bool = True             # time HF transformers' own generate on the same checkpoint and prompts
    layers: int | None = None   # decoder layers; None: the real model's
    hidden: int = 64
    expert_intermediate: int = 32
    dense_intermediate: int = 128   # DeepSeek's dense first layer
    heads: int = 4
    vocab: int = 260
    seed: int = 0
    interleave: str = "step"    # how the round's decodes took turns: "step" (`Turns`); "decode" in runs before it


QUICK = OverheadConfig(tokens=16, warmup=4, repeats=2, layers=4)


# ---- models ----------------------------------------------------------------------------------------------------
def hf_config(shape: Shape, cfg: OverheadConfig):
    """The shrunk transformers config of `shape` (layers: cfg.layers, else the real count)."""
    import transformers

    layers = cfg.layers or shape.layers
    common = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=layers,
                  num_attention_heads=cfg.heads, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if shape.model_type == "mixtral":     # 32 heads : 8 KV heads
        return transformers.MixtralConfig(**common, num_key_value_heads=max(1, cfg.heads // 4),
                                          intermediate_size=cfg.expert_intermediate, num_local_experts=shape.experts,
                                          num_experts_per_tok=shape.top_k)
    if shape.model_type == "qwen3_moe":   # 32 heads : 4 KV heads, every layer MoE, top-k renormalised
        return transformers.Qwen3MoeConfig(**common, num_key_value_heads=max(1, cfg.heads // 8),
                                           head_dim=cfg.hidden // cfg.heads, intermediate_size=cfg.dense_intermediate,
                                           moe_intermediate_size=cfg.expert_intermediate, num_experts=shape.experts,
                                           num_experts_per_tok=shape.top_k, norm_topk_prob=True,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    if shape.model_type == "deepseek_v2":  # MLA without q compression; greedy softmax routing, one group, unscaled
        head = cfg.hidden // cfg.heads
        return transformers.DeepseekV2Config(**common, num_key_value_heads=cfg.heads,
                                             intermediate_size=cfg.dense_intermediate,
                                             moe_intermediate_size=cfg.expert_intermediate,
                                             n_routed_experts=shape.experts, num_experts_per_tok=shape.top_k,
                                             n_shared_experts=shape.shared, first_k_dense_replace=shape.first_dense,
                                             kv_lora_rank=2 * cfg.hidden, q_lora_rank=None, qk_nope_head_dim=head,
                                             qk_rope_head_dim=head // 2, v_head_dim=head, n_group=1, topk_group=1,
                                             topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False)
    raise KeyError(shape.model_type)


def build_model(shape: Shape, cfg: OverheadConfig, root: Path = MODELS_DIR) -> Path:
    """The checkpoint of `shape` under `root`, built on first use (keyed by the config's hash) and reused after.

    Weights as tests/tiny_models.py draws them (routed experts and routers N(0, 0.2), so routing varies between
    tokens), saved in bf16; the EOS row of the LM head is zeroed so that greedy decoding never ends early (its logit
    is 0 while the largest of the others is positive)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(shape, cfg)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = root / f"{shape.key}-{config.num_hidden_layers}l-{digest}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "gate" in name or "router" in name):
                p.normal_(0.0, 0.2)
        model.get_output_embeddings().weight[config.eos_token_id].zero_()
    model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# ---- instrumentation -------------------------------------------------------------------------------------------
class Timed:
    """`fn`, timed: each call appends its (start, end) perf_counter stamps to `spans`."""

    def __init__(self, fn, spans: list[tuple[float, float]]):
        self.fn, self.spans = fn, spans

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.fn(*args, **kw)
        self.spans.append((t0, time.perf_counter()))
        return out


class Probe:
    """Spans of one Runtime's expert-function calls, executor calls and (prefetching policies) predictions, on the
    compute thread."""

    def __init__(self, rt):
        self.expert: list[tuple[float, float]] = []
        self.executor: list[tuple[float, float]] = []
        self.predict: list[tuple[float, float]] = []
        self.route: list[tuple[float, float]] = []
        if getattr(rt.executor, "next_router", None) is not None:   # the next layer's router on the call's input
            rt.executor.next_router = Timed(rt.executor.next_router, self.predict)
        rt.executor.expert_fn = Timed(rt.executor.expert_fn, self.expert)
        if getattr(rt.executor, "grouped_fn", None) is not None:    # the grouped call over experts or slots
            rt.executor.grouped_fn = Timed(rt.executor.grouped_fn, self.expert)
        timed = Timed(rt.executor, self.executor)
        for block in rt.lm.blocks.values():
            block.executor = timed
            block.route = Timed(block.route, self.route)
            block.route_paired = Timed(block.route_paired, self.route)

    def clear(self) -> None:
        self.expert.clear()
        self.executor.clear()
        self.predict.clear()
        self.route.clear()


def inside_each(spans, windows) -> list[float]:
    """Per window (lo, hi), in order, the seconds of the spans within it; spans and windows in time order (one
    pass over both)."""
    out, i = [], 0
    for lo, hi in windows:
        while i < len(spans) and spans[i][0] < lo:
            i += 1
        t = 0.0
        while i < len(spans) and spans[i][1] <= hi:
            t += spans[i][1] - spans[i][0]
            i += 1
        out.append(t)
    return out


@dataclass(frozen=True)
class Measure:
    """One timed decode: sums over its steps (seconds), and counts."""

    steps: int          # timed decode steps (n - 1)
    calls: int          # MoE layer calls in them (steps x L)
    rows: int
    wall_s: float       # T
    expert_s: float     # E
    executor_s: float   # X
    stall_s: float      # S
    inline_copy_s: float  # C
    copy_s: float       # mean copy time per load (inline, or on the loader thread)
    loads: int
    hit_rate: float
    # per timed step, seconds (empty in runs before they were kept):
    step_wall: tuple[float, ...] = ()   # T
    step_own: tuple[float, ...] = ()    # T - E - S - C
    step_exec: tuple[float, ...] = ()   # X - E - S - C
    predict_s: float = 0.0              # P: inside the prediction prefetching reads (part of X - E - S - C)
    route_s: float = 0.0                # R: inside the blocks' routers (routing and any prediction)
    paired: bool = False                # the blocks route and predict in one matmul (MoEBlock.pair)

    def per_call_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.calls

    @property
    def step_ms(self) -> float:
        return 1e3 * self.wall_s / self.steps

    @property
    def own_ms(self) -> float:
        return self.per_call_ms(self.wall_s - self.expert_s - self.stall_s - self.inline_copy_s)

    @property
    def executor_own_ms(self) -> float:
        return self.per_call_ms(self.executor_s - self.expert_s - self.stall_s - self.inline_copy_s)

    @property
    def load_ms(self) -> float:
        return self.per_call_ms(self.loads * self.copy_s)

    @property
    def loads_per_token(self) -> float:
        return self.loads / (self.rows * self.steps)


class Turns:
    """Decodes that take turns one step at a time, each on its own thread: only the decode whose turn it is runs; at
    each new token it hands the turn to the next one (in a fixed cycle) and waits for its own to come back. A round of
    policies is then interleaved step by step, so the machine's drift (on this 2-core VM the same decode's speed moves
    by 2x within an hour) moves every policy's steps alike and cancels in their comparison."""

    def __init__(self, names: list[str]):
        self.cond = threading.Condition()
        self.active, self.pos = list(names), 0          # the decodes still running; whose turn it is

    def _mine(self, name: str) -> bool:
        return bool(self.active) and self.active[self.pos] == name

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self._mine(name))

    def pass_on(self, name: str) -> None:
        """The turn to the next decode; back when it is `name`'s again."""
        with self.cond:
            self.pos = (self.active.index(name) + 1) % len(self.active)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self._mine(name))

    def leave(self, name: str) -> None:
        with self.cond:
            i = self.active.index(name)
            self.active.pop(i)
            if self.pos > i or self.pos >= len(self.active):
                self.pos = (self.pos - 1) % len(self.active) if self.pos > i else 0
            self.cond.notify_all()


class Turn:
    """One decode's place in `Turns`. `step()` is called at each new token: it ends the decode's step (the first
    ends the prefill, which is not timed), hands the turn on and starts the next step when the turn comes back;
    `windows` are the timed steps' (start, end) perf_counter stamps, which hold only this decode's work."""

    def __init__(self, turns: Turns, name: str, snap: Callable[[], tuple] | None = None):
        self.turns, self.name, self.snap = turns, name, snap
        self.windows: list[tuple[float, float]] = []
        self.marks: list[tuple[tuple, tuple]] = []      # per window: snap() at its start and at its end
        self._start: float | None = None
        self._mark: tuple = ()

    def step(self) -> None:
        end = time.perf_counter()
        if self._start is not None:
            self.windows.append((self._start, end))
            if self.snap is not None:
                self.marks.append((self._mark, self.snap()))
        self.turns.pass_on(self.name)
        if self.snap is not None:
            self._mark = self.snap()                     # outside the window: not timed
        self._start = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return sum(b - a for a, b in self.windows)


def take_turns(jobs: dict[str, Callable[[Turns], "Measure"]]) -> dict[str, "Measure"]:
    """Run the decodes `jobs` (name -> job(turns), which times itself with a `Turn` of `turns`) interleaved step by
    step, each on a thread of its own with this thread's torch thread count; their Measures by name. A job's error is
    raised here, after the others finished."""
    turns, n_threads = Turns(list(jobs)), torch.get_num_threads()
    out: dict[str, Measure] = {}
    errors: list[BaseException] = []

    def run(name: str, job) -> None:
        torch.set_num_threads(n_threads)
        try:
            turns.wait(name)
            out[name] = job(turns)
        except BaseException as e:   # noqa: BLE001 - re-raised below, once every decode has left
            errors.append(e)
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=run, args=(name, job), name=f"decode-{name}") for name, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def timed_decode(rt, probe: Probe, ids: torch.Tensor, tokens: int, turns: Turns, name: str) -> Measure:
    """Greedy decode of `tokens` new tokens for prompts ids [B, P], measured over its steps after the first (the
    windows of its `Turn`), in sum and step by step."""

    def snap() -> tuple[float, float]:               # (S, C) so far
        t = rt.stats.total()
        return t.stall_s, t.copy_s

    turn = Turn(turns, name, snap)
    rt.stats.reset()
    probe.clear()
    events = getattr(rt.executor, "events", None)   # the loader-thread row's (record_events); else none
    if events is not None:
        events.clear()
    out = rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=tokens, on_step=lambda _: turn.step())
    steps = tokens - 1
    assert out.shape[1] == tokens and len(turn.windows) == steps, f"decode stopped after {out.shape[1]} of {tokens}"
    lo, hi = turn.windows[0][0], turn.windows[-1][1]
    d, total = rt.stats.to_dict(), rt.stats.total()       # decode phase: the timed steps
    copies, n_copies = total.copy_s, d["loads"]           # inline copies; else the loader thread's, from its events
    if events is not None:
        loads = [ev[2] - ev[1] for ev in events if ev[0] == "load" and lo <= ev[1] <= hi]
        copies, n_copies = sum(loads), len(loads)
    e_w, x_w = inside_each(probe.expert, turn.windows), inside_each(probe.executor, turn.windows)   # [steps]
    wall_w = [b - a for a, b in turn.windows]
    s_c = [(s1 - s0 + c1 - c0) for (s0, c0), (s1, c1) in turn.marks]                              # S + C per step
    return Measure(steps=steps, calls=steps * len(rt.lm.arch.moe_layers), rows=ids.shape[0], wall_s=turn.wall_s,
                   expert_s=sum(e_w), executor_s=sum(x_w), stall_s=total.stall_s, inline_copy_s=total.copy_s,
                   copy_s=copies / max(n_copies, 1), loads=d["loads"], hit_rate=d["hit_rate"], step_wall=tuple(wall_w),
                   step_own=tuple(w - e - sc for w, e, sc in zip(wall_w, e_w, s_c)),
                   step_exec=tuple(x - e - sc for x, e, sc in zip(x_w, e_w, s_c)),
                   predict_s=sum(inside_each(probe.predict, turn.windows)),
                   route_s=sum(inside_each(probe.route, turn.windows)),
                   paired=any(b.paired is not None for b in rt.lm.blocks.values()))


def hf_decode(model, ids: torch.Tensor, tokens: int, turns: Turns, name: str) -> Measure:
    """HF transformers' own greedy `generate` (its model, MoE blocks and cache; bf16, as resident computes) of
    `tokens` new tokens for ids [B, P], timed as `timed_decode` times ours: a stopping criterion ends each step at
    its new token (`turn`), and the steps after the first are timed. Only the step time is known (no expert/executor
    split)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    turn = Turn(turns, name)

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            turn.step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([Stamp()]), pad_token_id=0)
    steps = tokens - 1
    assert out.shape[1] - ids.shape[1] == tokens and len(turn.windows) == steps, "HF generate stopped early"
    return Measure(steps=steps, calls=0, rows=ids.shape[0], wall_s=turn.wall_s, expert_s=0.0,
                   executor_s=0.0, stall_s=0.0, inline_copy_s=0.0, copy_s=0.0, loads=0, hit_rate=1.0,
                   step_wall=tuple(b - a for a, b in turn.windows))


@dataclass(frozen=True)
class Cell:
    model: str
    batch: int
    policy: str
    m: Measure                  # the repeat with the median step time
    runs: tuple[Measure, ...]   # every repeat, in run order (repeat r of every policy ran in the same round,
                                # step by step)
    copies: str = ""            # where the loader copied: "inline" (compute thread) | "thread" | "" (no loads)


def paired(c: Cell, ref: Cell, f) -> tuple[float, float, float]:
    """(median, min, max) over the repeats of f(c's repeat r) - f(ref's repeat r): the two ran in the same round, so
    the machine's drift between rounds cancels and the spread is what is left of its noise."""
    d = sorted(f(a) - f(b) for a, b in zip(c.runs, ref.runs))
    return d[(len(d) - 1) // 2], d[0], d[-1]


def paired_ratio(c: Cell, ref: Cell) -> tuple[float, float, float]:
    """(median, min, max) over the repeats of c's step time / ref's in the same round."""
    d = sorted(a.wall_s / a.steps / (b.wall_s / b.steps) for a, b in zip(c.runs, ref.runs))
    return d[(len(d) - 1) // 2], d[0], d[-1]


BOOT = 2000                   # paired-bootstrap resamples of the steps (`compare`)


def _steps(c: Cell, ref: Cell, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-step figures `key` of c and ref, paired: step n of repeat r of each (they ran next to each other)."""
    a = np.concatenate([np.asarray(getattr(m, key), dtype=np.float64) for m in c.runs])
    b = np.concatenate([np.asarray(getattr(m, key), dtype=np.float64) for m in ref.runs])
    assert a.shape == b.shape, f"{c.policy} and {ref.policy} have different steps"
    return a, b


def compare(c: Cell, ref: Cell, what: str) -> tuple[float, float, float, str]:
    """c against ref: (value, lo, hi, how). what: "own" | "exec" (c's own / executor-own time per MoE layer call
    minus ref's, ms) | "step" (ms per step minus ref's) | "ratio" (c's step time / ref's).

    With per-step figures (runs since the step interleaving): value = the difference of the means over every paired
    step (or the ratio of the summed step times), lo and hi the 2.5th and 97.5th percentiles of the same over BOOT
    resamples of the paired steps with replacement (seeded): each step of c ran next to its pair of ref, so the
    machine's drift cancels and the interval carries what is left of its noise. Without them (older runs): the
    median over the repeats of the per-repeat figure, and its range."""
    if c.m.step_wall and ref.m.step_wall:
        key = {"own": "step_own", "exec": "step_exec", "step": "step_wall", "ratio": "step_wall"}[what]
        a, b = _steps(c, ref, key)
        draw = np.random.default_rng(0).integers(0, len(a), size=(BOOT, len(a)))       # [BOOT, N] step draws
        if what == "ratio":
            value, boot = a.sum() / b.sum(), a[draw].sum(axis=1) / b[draw].sum(axis=1)
        else:
            per = 1e3 * c.m.steps / c.m.calls if what in ("own", "exec") else 1e3   # s/step -> ms per call, ms
            value, boot = (a - b).mean() * per, (a - b)[draw].mean(axis=1) * per
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return float(value), float(lo), float(hi), f"{len(a)} paired steps, 95% interval"
    if what == "ratio":
        return (*paired_ratio(c, ref), "median over the repeats, their range")
    f = {"own": lambda x: x.own_ms, "exec": lambda x: x.executor_own_ms, "step": lambda x: x.step_ms}[what]
    return (*paired(c, ref, f), "median over the repeats, their range")


def verdict(lo: float, hi: float, goal: float) -> str:
    """met when all of [lo, hi] (the interval, or the repeats' range) meets the goal, missed when none of it does,
    else not resolved (the noise straddles it)."""
    return "met" if hi <= goal else "missed" if lo > goal else "not resolved"


def run_model(shape: Shape, cfg: OverheadConfig, model_dir: Path, log) -> tuple[list[Cell], dict]:
    """Every (batch, policy) cell of one model; the policies' runtimes stay loaded and take turns. Once they are
    loaded, the process's objects are frozen out of the cyclic garbage collector (`freeze_loaded`); returns the cells
    and what the collector did (`GcWatch.figures`)."""
    from runtime import Runtime

    rts, probes, watch = {}, {}, None
    hfs = {}   # HF's default experts implementation (what a user gets) and its eager one (lossless's reference)
    if cfg.hf:
        from transformers import AutoModelForCausalLM

        hfs = {"hf": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval(),
               "hf-eager": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                experts_implementation="eager").eval()}
    try:
        for p in (*cfg.policies, *([THREAD] if cfg.thread_variant else [])):
            t0 = time.perf_counter()
            rts[p] = Runtime.load(model_dir, policy="lru" if p == THREAD else p,
                                  cache=None if p == "resident" else cfg.cache, record_events=p == THREAD)
            if p == THREAD:
                rts[p].loader.inline = False
            probes[p] = Probe(rts[p])
            log(f"{shape.key}: loaded {p} in {time.perf_counter() - t0:.1f} s")
        watch = GcWatch(freeze_loaded())
        cells = []
        for batch in cfg.batches:
            gen = torch.Generator().manual_seed(cfg.seed + batch)
            prompts = [torch.randint(3, cfg.vocab, (batch, cfg.prompt), generator=gen) for _ in range(cfg.repeats + 1)]
            runs: dict[str, list[Measure]] = {p: [] for p in [*rts, *hfs]}
            names = list(runs)
            for r in range(-1, cfg.repeats):   # -1: the warm-up round (its prompt is not one of the timed ones)
                ids, tokens = prompts[r + 1], cfg.warmup if r < 0 else cfg.tokens
                jobs = {p: (lambda turns, p=p: timed_decode(rts[p], probes[p], ids, tokens, turns, p)) for p in rts}
                jobs |= {n: (lambda turns, n=n, m=m: hf_decode(m, ids, tokens, turns, n)) for n, m in hfs.items()}
                order = names[r % len(names):] + names[:r % len(names)]     # who goes first rotates by round
                done = take_turns({n: jobs[n] for n in order})
                if r >= 0:
                    for n in names:
                        runs[n].append(done[n])
            for p, ms in runs.items():
                ranked = sorted(ms, key=lambda m: m.wall_s)
                copies = "" if p in ("resident", *HF_ROWS) else ("inline" if rts[p].loader.inline else "thread")
                cells.append(Cell(shape.key, batch, p, ranked[(len(ranked) - 1) // 2], tuple(ms), copies))
                log(f"{shape.key} batch {batch} {p}: {cells[-1].m.step_ms:.2f} ms/step"
                    + ("" if p in HF_ROWS else f", own {cells[-1].m.own_ms:.3f} ms/layer"))
        return cells, watch.figures()
    finally:
        if watch is not None:
            watch.stop()
        if gc.get_freeze_count():
            gc.unfreeze()                        # the next model's load may collect this one's garbage again
        for rt in rts.values():
            rt.close()


def freeze_loaded() -> tuple[int, float]:
    """(objects, ms): one full collection of the loaded process, timed, then every object left frozen out of the
    collector (`gc.freeze`, what moe-serve does after startup). The process holds several runtimes, HF's models and
    the libraries (the section prints how many objects, and what their collection took); a full collection
    traverses all of them, and one that fell inside a timed step added its pause to that policy's step alone.
    Objects made after this are collected as usual."""
    t0 = time.perf_counter()
    gc.collect()
    ms = (time.perf_counter() - t0) * 1e3
    gc.freeze()
    return gc.get_freeze_count(), ms


class GcWatch:
    """Counts the full collections (generation 2) from now on, and their time, through `gc.callbacks`."""

    def __init__(self, frozen: tuple[int, float]):
        self.frozen, self.full, self.full_ms, self._t0 = frozen, 0, 0.0, 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.full += 1
            self.full_ms += (time.perf_counter() - self._t0) * 1e3

    def stop(self) -> None:
        if self._on in gc.callbacks:
            gc.callbacks.remove(self._on)

    def figures(self) -> dict:
        self.stop()
        return {"frozen": self.frozen[0], "collect_ms": self.frozen[1], "full": self.full, "full_ms": self.full_ms}


# ---- report ----------------------------------------------------------------------------------------------------
def f3(x: float) -> str:
    return f"{x:.3f}"


def table(cells: list[Cell]) -> list[str]:
    ref = {(c.model, c.batch): c for c in cells if c.policy == "resident"}
    hf = {(c.model, c.batch): c.m for c in cells if c.policy == "hf"}
    steps = all(c.m.step_wall for c in cells)
    span = "[95% interval]" if steps else "[min, max]"
    lines = [f"| model | batch | policy | ms / step | x HF | own ms / MoE layer | over resident {span} | "
             f"executor over resident {span} | executor own ms / layer | expert ms / layer | stall ms / layer | "
             "load ms / layer | loads / token | hit rate | copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        m, r, h = c.m, ref.get((c.model, c.batch)), hf.get((c.model, c.batch))
        x_hf = "" if h is None else f"{m.step_ms / h.step_ms:.2f}"
        if c.policy in HF_ROWS:
            lines.append(f"| {c.model} | {c.batch} | {HF_ROWS[c.policy]} | {m.step_ms:.2f} | {x_hf} |  |  |  |  |  |  "
                         "|  |  |  |  |")
            continue
        over = ex_over = ""
        if r is not None and c.policy != "resident":
            over = "{:+.3f} [{:+.3f}, {:+.3f}]".format(*compare(c, r, "own")[:3])
            ex_over = "{:+.3f} [{:+.3f}, {:+.3f}]".format(*compare(c, r, "exec")[:3])
        lines.append(f"| {c.model} | {c.batch} | {c.policy} | {m.step_ms:.2f} | {x_hf} | {f3(m.own_ms)} | {over} | "
                     f"{ex_over} | {f3(m.executor_own_ms)} | {f3(m.per_call_ms(m.expert_s))} | "
                     f"{f3(m.per_call_ms(m.stall_s))} | {f3(m.load_ms)} | {m.loads_per_token:.2f} | {m.hit_rate:.1%} | "
                     f"{c.copies} |")
    return lines


HF_ROWS = {"hf": "HF generate", "hf-eager": "HF generate, eager experts"}
THREAD = "lru-thread"                 # lru with its copies forced onto the loader thread (a diagnostic row)
GOAL_OVER_MS = {1: 0.050, 3: 0.100}   # issue #13: the runtime's own time per MoE layer call, 128-expert shape
GOAL_X_HF = 1.05                      # issue #13: resident's step time over HF generate's, every shape


def goals(cells: list[Cell]) -> list[str]:
    """Issue #13's overhead goals, each a verdict on the interval of `compare` (`verdict`: met when all of it meets
    the goal, missed when none of it does): the offloading policies' own time per MoE layer call over resident's on
    the 128-expert shape, and resident's step time over HF generate's."""
    out = []
    ref = {(c.model, c.batch): c for c in cells if c.policy == "resident"}
    for c in cells:
        r = ref.get((c.model, c.batch))
        if c.model == "qwen3-30b-a3b" and c.policy not in ("resident", THREAD, *HF_ROWS) and r is not None \
                and c.batch in GOAL_OVER_MS:
            mid, lo, hi, how = compare(c, r, "own")
            goal = GOAL_OVER_MS[c.batch]
            out.append(f"- {c.policy}, Qwen3-30B-A3B shape, batch {c.batch}: {mid * 1e3:+.0f} us per MoE layer call "
                       f"over resident ({how} {lo * 1e3:+.0f} to {hi * 1e3:+.0f}); goal <= {goal * 1e3:.0f} us: "
                       f"**{verdict(lo, hi, goal)}**")
    for c in cells:
        h = next((x for x in cells if x.policy == "hf" and (x.model, x.batch) == (c.model, c.batch)), None)
        if c.policy == "resident" and h is not None:
            mid, lo, hi, how = compare(c, h, "ratio")
            e = next((y for y in cells if y.policy == "hf-eager" and (y.model, y.batch) == (c.model, c.batch)), None)
            eager = "" if e is None else f"; {compare(c, e, 'ratio')[0]:.2f}x its eager experts'"
            out.append(f"- resident, {c.model}, batch {c.batch}: {mid:.2f}x HF generate's step time ({how} "
                       f"{lo:.2f}x to {hi:.2f}x{eager}); goal <= {GOAL_X_HF}x: **{verdict(lo, hi, GOAL_X_HF)}**")
    return out


def findings(cells: list[Cell], shapes: dict[str, Shape], layers: dict[str, int]) -> list[str]:
    """Sentences computed from the cells."""
    out = []
    refs = {(c.model, c.batch): c for c in cells if c.policy == "resident"}
    for (model, batch), rc in refs.items():
        r = rc.m
        off = [c for c in cells if (c.model, c.batch) == (model, batch)
               and c.policy not in ("resident", THREAD, *HF_ROWS)]
        if not off:
            continue
        over = sorted(((compare(c, rc, "own")[0], c.policy) for c in off))
        ex_over = sorted(compare(c, rc, "exec")[0] for c in off)
        step_over = [compare(c, rc, "step")[0] for c in off]
        how = "means over the paired steps" if rc.m.step_wall else "medians over the repeats"
        n = layers[model]
        out.append(f"- {shapes[model].real} shape ({n} MoE layers, {shapes[model].experts} experts, top-"
                   f"{shapes[model].top_k}), batch {batch}: resident's own time is {f3(r.own_ms)} ms per MoE layer "
                   f"call (its executor's {f3(r.executor_own_ms)} ms); the offloading policies add from "
                   f"{f3(over[0][0])} ms ({over[0][1]}) to {f3(over[-1][0])} ms ({over[-1][1]}) per call ({how}), "
                   f"the executor's own time changing by {f3(ex_over[0])} to {f3(ex_over[-1])} ms; "
                   f"per decode step that is "
                   f"from {min(step_over):.2f} to {max(step_over):.2f} ms ({round(100 * min(step_over) / r.step_ms)}% to "
                   f"{round(100 * max(step_over) / r.step_ms)}% of resident's {r.step_ms:.2f} ms).")
    off = [c for c in cells if c.policy not in ("resident", *HF_ROWS)]
    if off:
        worst_load = max(off, key=lambda c: c.m.load_ms)
        worst_stall = max(off, key=lambda c: c.m.stall_s / c.m.calls)
        where = sorted({c.copies for c in off if c.copies})
        out.append(f"- Loads (copies {' and '.join({'inline': 'inline, on the compute thread', 'thread': 'on the loader thread, overlapping compute'}[w] for w in where)}) take at most {f3(worst_load.m.load_ms)} "
                   f"ms per MoE layer call ({worst_load.model}, {worst_load.policy}, batch {worst_load.batch}); the "
                   f"compute thread waited for them at most {f3(worst_stall.m.per_call_ms(worst_stall.m.stall_s))} ms "
                   f"per call ({worst_stall.model}, {worst_stall.policy}, batch {worst_stall.batch}).")
    pairs = [(c, t) for c in cells for t in cells if c.policy == "lru" and t.policy == THREAD
             and (c.model, c.batch) == (t.model, t.batch)]
    if pairs:
        out.append("- lru with its copies on the loader thread against inline on the compute thread (same run): "
                   + "; ".join(f"{c.model} batch {c.batch} {t.m.step_ms:.2f} vs {c.m.step_ms:.2f} ms/step "
                               f"({t.m.step_ms / c.m.step_ms:.2f}x), expert function {f3(t.m.per_call_ms(t.m.expert_s))} "
                               f"vs {f3(c.m.per_call_ms(c.m.expert_s))} ms per MoE layer call" for c, t in pairs)
                   + "." + (" With the thread the expert function itself ran slower in every pair (the loader "
                            "thread's Python holds the GIL the compute thread's torch ops take again)."
                            if all(t.m.expert_s / t.m.calls > c.m.expert_s / c.m.calls for c, t in pairs) else ""))
    from runtime.policy.config import preset

    pred = [c for c in cells if c.policy in OverheadConfig().policies and preset(c.policy).prefetch
            and (c.model, c.batch) in refs]
    if pred:
        def routing_over(c: Cell) -> float:
            """R(policy) - R(resident), ms per MoE layer call: what the prediction costs."""
            r = refs[(c.model, c.batch)]
            return c.m.per_call_ms(c.m.route_s) - r.m.per_call_ms(r.m.route_s)

        def share(c: Cell) -> str:
            return (f"{c.policy}, {c.model}, batch {c.batch}: {f3(routing_over(c))} of its "
                    f"{f3(compare(c, refs[(c.model, c.batch)], 'own')[0])} ms per MoE layer call over resident"
                    + (" (its routing and the prediction in one matmul)" if c.m.paired else
                       f" ({f3(c.m.per_call_ms(c.m.predict_s))} in the executor's next_router)"))
        below = [c for c in pred if c.m.paired and routing_over(c) < 0]
        out.append("- The prediction a prefetching policy reads (the next MoE layer's router on the call's input: its "
                   "logits, gate and top-k) is part of its own time; what it costs is the policy's time inside the "
                   "routers less resident's (R, the script's docstring): " + "; ".join(share(c) for c in pred) + "."
                   + (f" In {len(below)} of these cells the paired routing, prediction included, took less than "
                      "resident's routing alone (no figure here has an interval): a paired block makes no field of "
                      "either routing until it is read, and leaves a bf16 cast of the mixture weights to the "
                      "executor's grouping kernel, where that part is counted (runtime.router.route_pair_logits)."
                      if below else ""))
    q = {c.policy: c for c in cells if c.model == "qwen3-30b-a3b" and c.batch == 1}
    if "resident" in q and {"lru", "smoe"} <= set(q):
        lo, hi = ISSUE_RANGE_MS
        adds = {p: compare(q[p], q["resident"], "own")[0] for p in ("lru", "smoe")}
        inside_range = [p for p, v in adds.items() if lo <= v <= hi]
        out.append(f"- Issue #13 put lru and smoe at {lo}-{hi} ms per MoE layer over resident on this shape at batch "
                   f"1; here lru adds {f3(adds['lru'])} ms and smoe {f3(adds['smoe'])} ms "
                   f"({', '.join(inside_range) if inside_range else 'neither'} within that range).")
    return out


def section(cells: list[Cell], cfg: OverheadConfig, shapes: dict[str, Shape], layers: dict[str, int],
            info: dict) -> str:
    lines = [f"Made by `{info['command']}` at commit {info['commit'] or 'unknown'} on {info['machine']}, torch "
             f"{torch.__version__}, one compute thread (`torch.set_num_threads(1)`), {info['date']}; the run took "
             f"{info['run_s']:.0f} s, load average {info['load'][0]:.2f} at its start and {info['load'][1]:.2f} at "
             "its end.", "",
             f"Random-weight bf16 checkpoints with the real layer and expert structure (hidden size {cfg.hidden}, "
             f"expert intermediate size {cfg.expert_intermediate}, {cfg.heads} heads, vocabulary {cfg.vocab}): "
             + "; ".join(f"{s.real}: {layers[s.key]} MoE layers of {s.experts} experts, top-{s.top_k}"
                         + (f", {s.shared} shared" if s.shared else "")
                         + (f", {s.first_dense} dense first" if s.first_dense else "") for s in shapes.values())
             + f". Cache {cfg.cache} of routed-expert bytes, no emulated link (a load is a copy from the mmap'd "
             "checkpoint: inline on the compute thread where the loader chooses that, column `copies`, else on the "
             f"loader thread); per cell a warm-up decode, then {cfg.repeats} greedy decode(s) of "
             f"{cfg.tokens} tokens after a {cfg.prompt}-token random prompt per row, the policies "
             + ("and HF transformers' own `generate` on the same checkpoint (bf16; its default experts "
                "implementation, and its eager one, which lossless mode reproduces bit for bit) " if cfg.hf else "")
             + ("interleaved step by step (one decode at a time, each handing the turn on at every new token; the "
                "steps are timed from getting the turn back to the next token)" if cfg.interleave == "step" else
                "taking turns decode by decode")
             + "; the figures are the repeat with the median step time; x HF = ms/step over HF "
             "generate's (default experts implementation).", "",
             "Per MoE layer call, over the timed steps: own = (step time - expert compute - load waits - inline "
             "copies) / MoE layers (the whole model but the experts and the link's work: with no link the compute "
             "thread makes small experts' copies itself, column load); executor own = (time in the executor - expert "
             "compute - waits - inline copies) / MoE layers; over resident = own - resident's own (same model, "
             "batch and prompts); load = copy time per MoE layer call, inline or on the loader thread (there it "
             "overlaps compute: only the waits, stall, are subtracted). Expert compute is the time inside the expert "
             "function (the GLU; the grouped call over every expert or cache slot at batch > 1). "
             "`plan` and `static` need a profile of calibration text and are not run.", ""]
    if info.get("gc"):
        g = info["gc"]
        lines += ["Once a model's runtimes and HF's models are loaded, the process's objects are frozen out of the "
                  "cyclic garbage collector (`gc.freeze`, as moe-serve does after startup), so that a full collection "
                  "does not fall on one policy's step: " + "; ".join(
                      f"{k}: {v['frozen']} objects, whose full collection took {v['collect_ms']:.0f} ms just before"
                      for k, v in g.items()) + ". Full collections during the decodes after that: "
                  + "; ".join(f"{k}: {v['full']} ({v['full_ms']:.1f} ms in all)" for k, v in g.items()) + ".", ""]
    lines += table(cells)
    lines += [""] + findings(cells, shapes, layers)
    verdicts = goals(cells)
    if verdicts:
        tally = {k: sum(f"**{k}**" in v for v in verdicts) for k in ("met", "missed", "not resolved")}
        rule = ("met when the whole 95% interval meets it, missed when none of it does"
                if all(c.m.step_wall for c in cells) else "met when every repeat meets it, missed when none does")
        lines += ["", f"Goals (issue #13; {rule}, else not resolved):",
                  ""] + verdicts + ["", f"{len(verdicts)} goal checks: " + ", ".join(f"{n} {k}" for k, n in tally.items())
                                    + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): 4 decoder layers, 16 tokens, 2 repeats")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(s.key for s in SHAPES))
    ap.add_argument("--json", default=None, help="where the run's figures are kept and --from-json reads them "
                    "(default out/benchmarks/overhead.json; overhead-quick.json with --quick)")
    ap.add_argument("--from-json", action="store_true", help="write the text from the figures of a finished run")
    args = ap.parse_args()
    if args.quick and args.write:
        ap.error("--quick is a smoke run with fewer layers and tokens; its figures do not go into BENCHMARKS.md")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_benchmarks import git_commit, machine
    from sections import write_section

    cfg = QUICK if args.quick else OverheadConfig()
    args.json = args.json or str(ROOT / "out" / "benchmarks" / f"overhead{'-quick' if args.quick else ''}.json")
    if args.models:
        cfg = replace(cfg, models=tuple(args.models.split(",")))
    known = {s.key: s for s in SHAPES}
    unknown = [m for m in cfg.models if m not in known]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        saved = json.loads(Path(args.json).read_text())
        cfg = OverheadConfig(**{"interleave": "decode",     # runs before `interleave` was recorded
                                **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["cfg"].items()}})
        shapes = {k: known[k] for k in cfg.models}
        cells = [Cell(c["model"], c["batch"], c["policy"], Measure(**c["m"]), tuple(Measure(**r) for r in c["runs"]),
                      c["copies"]) for c in saved["cells"]]
        layers, info = saved["layers"], saved["info"]
    else:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        shapes = {k: known[k] for k in cfg.models}
        cells, layers, gcs = [], {}, {}
        from runtime.families import resolve_arch

        for key, shape in shapes.items():
            model_dir = build_model(shape, cfg)
            layers[key] = len(resolve_arch(hf_config(shape, cfg)).moe_layers)
            model_cells, gcs[key] = run_model(shape, cfg, model_dir, log)
            cells += model_cells
        info = {"command": shlex.join(["python", "benchmarks/overhead.py"] + sys.argv[1:]), "commit": git_commit(),
                "machine": machine()["summary"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "run_s": time.perf_counter() - t0, "load": (load0, os.getloadavg()[0]), "gc": gcs}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cfg": asdict(cfg), "layers": layers, "info": info,
                                               "cells": [asdict(c) for c in cells]}, indent=1))
    text = section(cells, cfg, shapes, layers, info)
    print(f"{HEADING}\n\n{text}")
    if args.write:
        write_section(str(ROOT / "docs" / "BENCHMARKS.md"), "overhead", HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
