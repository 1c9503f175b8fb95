"""The lean decision path of lossless lru/lfu/lfru (runtime.policy.fast) decides exactly as the reference CacheModel,
and the executor's lean branch computes what resident computes, bit for bit."""
import numpy as np
import pytest
import torch

from runtime import Runtime
from runtime.policy.compiled import CompiledCacheModel
from runtime.policy.config import preset
from runtime.policy.fast import FastCacheModel, make_cache_model
from runtime.policy.lean import LeanCacheModel
from runtime.policy.plan_params import substitution_params
from runtime.policy.pools import Pools
from runtime.policy.schedule import CacheModel
from runtime.policy.static import static_pins

RULES = ("lru", "lfu", "lfru")


def _models(rule, slots, e, k, layers=(0, 1), initial=None):
    pol = preset(rule, host_compute=False)
    params = substitution_params(pol, list(layers))
    args = ({l: slots for l in layers}, e, k, pol, params)
    return CacheModel(*args, initial=initial), FastCacheModel(*args, initial=initial)


def _trace(rng, calls, batch, e, k, hot):
    """Per call: chosen [T, k] and per-token top-2k score dicts; a few hot experts so that hits, ties and reuse
    happen."""
    weights = np.ones(e)
    weights[rng.choice(e, size=hot, replace=False)] = 8.0
    p = weights / weights.sum()
    out = []
    for _ in range(calls):
        chosen, rows = [], []
        for _ in range(batch):
            ids = rng.choice(e, size=min(2 * k, e), replace=False, p=p)
            s = np.sort(rng.random(len(ids)))[::-1]
            s[rng.random(len(s)) < 0.2] = s[0]                       # equal scores: the id breaks the tie
            rows.append({int(i): float(v) for i, v in zip(ids, s)})
            chosen.append([int(i) for i in ids[:k]])
        out.append((rows, chosen))
    return out


def _same(ref, fast, layer, rows, chosen):
    a = ref.schedule(layer, rows, chosen)
    b = fast.schedule(layer, rows, chosen)
    assert b.ops == a.ops
    assert b.counts == a.counts
    assert [d.exact for d in b.decisions] == [d.exact for d in a.decisions]
    assert fast.resident == ref.resident
    for e in range(ref.e):   # the rules' state: last use (and uses since the load, which lru does not read)
        if e in ref.resident[layer]:
            st = fast.state[layer]
            assert st.last_used[e] == ref.last_used[layer].get(e, -1)
            if fast.rule != "lru":
                assert st.uses[e] == ref.uses[layer].get(e, 0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("e,k", [(16, 4), (128, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_model_decides_as_the_cache_model(rule, e, k, batch):
    rng = np.random.default_rng(hash((rule, e, k, batch)) % 2**32)
    slot_choices = sorted({1, 2, k - 1, k, k + 1, e // 4, e // 2, e - 1, e})
    for seed in range(3):
        for slots in slot_choices:
            initial = {0: rng.choice(e, size=min(slots + 2, e), replace=False).tolist()} if seed == 1 else None
            ref, fast = _models(rule, slots, e, k, initial=initial)
            assert fast.resident == ref.resident
            for n, (rows, chosen) in enumerate(_trace(rng, 12 if e == 128 else 20, batch, e, k, hot=k + 2)):
                _same(ref, fast, n % 2, rows, chosen)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_model_reads_the_score_table_only_for_misses(rule, batch):
    """The executor passes every expert's score [T, E] as a callable: the decisions equal the reference's, and the
    table is read only when two or more experts miss (their order)."""
    e, k = 32, 4
    rng = np.random.default_rng(7 + batch)
    ref, _ = _models(rule, 8, e, k)
    fast = _models(rule, 8, e, k)[1]
    reads = []
    for n, (rows, chosen) in enumerate(_trace(rng, 40, batch, e, k, hot=k + 2)):
        table = rng.random((batch, e)).astype(np.float32) + 2.0         # not the scores, off the chosen pairs
        for t, r in enumerate(rows):
            for i, v in r.items():
                table[t, i] = v
        table = table.astype(np.float64).astype(np.float32)
        rows = [{i: float(table[t, i]) for i in r} for t, r in enumerate(rows)]
        a = ref.schedule(0, rows, chosen)
        b = fast.schedule_arrays(0, np.asarray(chosen), table=lambda: reads.append(1) or table)
        assert b.ops == a.ops and b.counts == a.counts and fast.resident == ref.resident
        misses = sum(op[0] == "load" for op in a.ops)
        assert len(reads) == (1 if misses > 1 else 0), (n, misses)
        reads.clear()


def test_fast_model_on_a_recorded_trace(small_profile):
    """The routing the profiler recorded on the shared fixture, replayed through both models."""
    from artifacts import Profile

    prof = Profile.load(small_profile)
    layers, e, k = prof.moe_layers, prof.num_experts, prof.top_k
    ids, scores = prof.trace["ids"][:48], prof.trace["scores"][:48]          # [T, M, W] top-W ids and scores
    for rule in RULES:
        for slots in (1, k, e // 2):
            ref, fast = _models(rule, slots, e, k, layers=layers)
            for start in range(0, len(ids), 3):                                # calls of 3 tokens, layer by layer
                for m, l in enumerate(layers):
                    i, s = ids[start:start + 3, m].tolist(), scores[start:start + 3, m].tolist()
                    _same(ref, fast, l, [dict(zip(a, b)) for a, b in zip(i, s)], [a[:k] for a in i])


def test_the_factory_picks_the_model():
    e, k, slots = 16, 4, {0: 4, 1: 4}
    for rule in RULES:
        pol = preset(rule, host_compute=False)
        assert isinstance(make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1])), FastCacheModel)
        # a precision plan's pools go to another model
        with pytest.raises(Exception):
            make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]), pools=object())
    for name, kw in [("smoe", {}), ("plan", {}), ("plan", {"alpha": 0.0})]:    # score eviction: compiled
        pol = preset(name, **kw)
        m = make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]))
        assert type(m) is CompiledCacheModel, (name, kw)
    for name, kw in [("lru", {"host_compute": True}), ("lru", {"prefetch": True}), ("lru", {"alpha": 0.3})]:
        pol = preset(name, **kw)
        m = make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]))
        assert type(m) is LeanCacheModel, (name, kw)
    pol = preset("plan")                       # a precision plan's pools: the lean model
    pools = Pools(("bfloat16", "int4"), (100, 28), {l: (0,) * 8 + (1,) * 8 for l in slots}, {l: (2, 2) for l in slots})
    assert type(make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]), pools=pools)) is LeanCacheModel
    pol = preset("static", host_compute=False)
    m = make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]),
                         pinned=static_pins({0: list(range(e)), 1: list(range(e))}, slots))
    assert type(m) is LeanCacheModel
    pol = preset("smoe", alpha=1.5)            # a band below 0: experts the token does not score are in it
    assert type(make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]))) is CacheModel
    pol = preset("oracle")
    from runtime.policy.eviction import NextUse
    m = make_cache_model(slots, e, k, pol, substitution_params(pol, [0, 1]), future=NextUse({0: [[1]], 1: [[1]]}))
    assert type(m) is CacheModel


def _lossless_runtime(path, rule, cache):
    """A Runtime of `rule` whose executor runs the fast model (the factory's choice), fresh from its start."""
    rt = Runtime.load(path, policy=rule, cache=cache)
    ex = rt.executor
    if not isinstance(ex.model, FastCacheModel):   # Runtime.load not wired to the factory yet: swap it in
        ex.model = make_cache_model(dict(rt.cache.slots), rt.lm.arch.num_experts, rt.lm.arch.top_k, ex.policy,
                                    substitution_params(ex.policy, rt.lm.arch.moe_layers))
    assert isinstance(ex.model, FastCacheModel)
    return rt


@pytest.mark.parametrize("rule,cache", [("lru", 8), ("lfru", "25%")])
def test_fast_path_logits_equal_resident(fixture_model, rule, cache):
    """Through the lean branch (loads, evictions and all), the logits are resident's, bit for bit."""
    ids = torch.randint(1, 4096, (3, 24), generator=torch.Generator().manual_seed(0))
    with Runtime.load(fixture_model, policy="resident") as rt:
        ref = rt.forward(ids)
    with _lossless_runtime(fixture_model, rule, cache) as rt:
        ours = rt.forward(ids)
        d = rt.stats.to_dict()
    assert torch.equal(ours, ref)
    assert d["loads"] > 0 and d["hit_rate"] < 1


def test_fast_path_generate_matches_resident(fixture_model):
    """Greedy decode at batch 1 (one token per layer call) through the lean branch: the same tokens as resident."""
    with Runtime.load(fixture_model, policy="resident") as rt:
        ref = rt.generate(["The function returns"], max_new_tokens=12)
    with _lossless_runtime(fixture_model, "lfu", 4) as rt:
        assert rt.generate(["The function returns"], max_new_tokens=12) == ref


def test_mix_pairs_adds_as_mix_does():
    """The lean branch's mixing of pairs grouped by ascending expert id equals `mix` per expert, bit for bit: float32
    (one index_add_) and bfloat16 (one add per rank; per expert when tokens have unequal pair counts) outputs,
    float32 weights, repeated tokens."""
    from runtime.expert_compute import mix
    from runtime.expert_compute import mix_pairs

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for t_n, e, k in [(1, 8, 2), (3, 128, 8), (37, 16, 4)]:
            idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t_n)])     # [T, k]
            w = torch.rand(t_n, k, generator=g)                                            # [T, k] float32
            x = torch.randn(t_n, 64, generator=g).to(dtype)
            order = np.argsort(idx.t().reshape(-1).numpy(), kind="stable")                 # pairs by expert
            tok, pos = torch.from_numpy(order % t_n), torch.from_numpy(order // t_n)
            y = torch.randn(len(order), 64, generator=g).to(dtype)                         # [N, H] unweighted
            experts, counts = np.unique(idx.numpy(), return_counts=True)
            ends = np.cumsum(counts)
            span = {int(ex): (int(b - n), int(b)) for ex, n, b in zip(experts, counts, ends)}
            ref = mix(x, [(ex, tok[a:b], y[a:b] * w[tok[a:b], pos[a:b], None]) for ex, (a, b) in span.items()])
            assert torch.equal(mix_pairs(x, tok.numpy(), y * w[tok, pos][:, None], span), ref), (dtype, t_n)
            if t_n > 1:   # drop the first pair: token pair counts differ
                e0, (a0, b0) = next(iter(span.items()))
                part = {ex: (a - 1, b - 1) for ex, (a, b) in span.items() if ex != e0 or b0 - a0 > 1}
                part[e0] = (a0, b0 - 1)
                y1, t1, p1 = y[1:], tok[1:], pos[1:]
                ref = mix(x, [(ex, t1[a:b], y1[a:b] * w[t1[a:b], p1[a:b], None]) for ex, (a, b) in sorted(part.items())
                              if b > a])
                assert torch.equal(mix_pairs(x, t1.numpy(), y1 * w[t1, p1][:, None], part), ref), (dtype, t_n)


@pytest.mark.parametrize("policy", ["lru", "smoe"])   # the fast model's ops; the lean model's (with prefetches)
def test_inline_and_threaded_loads_agree(fixture_model, policy):
    """On the CPU with no link small experts are copied inline (runtime.loader); the loader thread gives the same
    logits, loads and bytes. With an emulated link the thread copies, overlapping compute. An inline copy leaves no
    ticket behind, and its time is metered as a landed ticket's (the load-cost meter: one figure per copy)."""
    ids = torch.randint(1, 4096, (2, 20), generator=torch.Generator().manual_seed(1))
    out = {}
    for inline in (True, False):
        with Runtime.load(fixture_model, policy=policy, cache=4) as rt:
            assert rt.loader.inline                      # 0.4 MB bf16 experts, CPU, no link
            rt.loader.inline = inline
            logits = rt.forward(ids)
            d = rt.stats.to_dict()
            # the compute thread's copying is counted when it copies (inline), and only then
            assert (d["inline_copy_s"] > 0) if inline else d["inline_copy_s"] == 0
            if inline:
                assert not rt.executor.tickets
                meter = rt.executor.c_load               # 4 slots for 40 tokens: every call streams (ops)
                assert len(meter._v) == min(meter.p, d["loads"]) and all(v > 0 for v in meter._v)
            out[inline] = (logits, d["loads"], d["bytes_loaded"], d["hit_rate"])
    assert torch.equal(out[True][0], out[False][0]) and out[True][1:] == out[False][1:] and out[True][1] > 0
    with Runtime.load(fixture_model, policy="lru", cache=4, link="1GB/s,1us") as rt:
        assert not rt.loader.inline
        with Runtime.load(fixture_model, policy="lru", cache=4) as ref:
            assert torch.equal(rt.forward(ids), ref.forward(ids))


def test_small_and_large_calls_group_alike(monkeypatch):
    """A decode call's pairs grouped in Python equal numpy's grouping of the same call: tokens, spans, weights,
    input rows and the token order mix_pairs adds by."""
    from runtime import expert_compute
    from runtime.expert_compute import group_pairs

    g = torch.Generator().manual_seed(1)
    for t_n, e, k in [(2, 8, 2), (3, 128, 8), (5, 16, 4)]:
        chosen = np.stack([torch.randperm(e, generator=g)[:k].numpy() for _ in range(t_n)])      # [T, k]
        x = torch.randn(t_n, 16, generator=g).to(torch.bfloat16)
        w = torch.rand(t_n, k, generator=g)
        small = group_pairs(x, chosen, w)
        monkeypatch.setattr(expert_compute, "SMALL_CALL", 0)
        large = group_pairs(x, chosen, w)
        monkeypatch.undo()
        assert small.span == large.span and list(small.span) == sorted(small.span)
        assert np.array_equal(small.tok, large.tok) and np.array_equal(small.by_token, large.by_token)
        assert torch.equal(small.weights, large.weights) and torch.equal(small.xs, large.xs)


def test_the_compiled_kernels_are_ready_when_the_runtime_is(fixture_model):
    """Loading a runtime of a compiled policy compiles (or reads from numba's disk cache) its kernels for the types a
    decode passes them: decoding (batch 1 and 2, with understudies) compiles nothing more."""
    from runtime.expert_compute import slot_rows
    from runtime.policy.compiled import decide_and_group, decide_and_group_pair, schedule_from_table, served_groups

    kernels = (schedule_from_table, served_groups, decide_and_group, decide_and_group_pair, slot_rows)
    with Runtime.load(fixture_model, policy="smoe", cache=4) as rt:
        before = tuple(len(k.signatures) for k in kernels)
        assert min(before) >= 1
        for rows in (1, 2):
            ids = torch.randint(1, 4096, (rows, 8), generator=torch.Generator().manual_seed(rows))
            rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=6)
        assert rt.stats.total().understudies["band"] > 0
        assert tuple(len(k.signatures) for k in kernels) == before



def test_kernels_call_only_kernels_of_their_own_file():
    """numba keys a kernel's disk cache by its own source file, so a kernel that called one from another file would
    keep running its cached copy of that one after an edit (or an update that leaves its own file untouched). Every
    runtime kernel calls only kernels defined in its own module."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    import runtime

    seen = 0
    for info in pkgutil.walk_packages(runtime.__path__, "runtime."):
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if not isinstance(obj, CPUDispatcher) or obj.py_func.__module__ != mod.__name__:
                continue
            seen += 1
            for name in obj.py_func.__code__.co_names:
                callee = obj.py_func.__globals__.get(name)
                if isinstance(callee, CPUDispatcher):
                    assert callee.py_func.__module__ == mod.__name__, (obj.py_func.__qualname__, name)
    assert seen >= 10

def test_a_substituting_prefetching_policy_routes_paired(fixture_model):
    """smoe (substitutes, prefetches) routes each MoE layer and predicts the next from one matmul (`pair_routers`):
    the executor never runs the next layer's router itself, and the decode, its decisions included, is the one a
    fresh runtime makes unpaired (on this CPU the shared bf16 matmul's columns are the lone ones'). Lossless
    policies, and smoe without substitution, route as HF does."""
    from runtime.model_loader import pair_routers

    ids = torch.randint(1, 4096, (2, 8), generator=torch.Generator().manual_seed(7))
    runs = []
    for paired in (True, False):
        with Runtime.load(fixture_model, policy="smoe", cache=4) as rt:
            layers = sorted(rt.lm.blocks)
            assert all(rt.lm.blocks[l].paired is not None for l in layers[:-1])
            if not paired:
                assert not pair_routers(rt.lm, on=False)
            asked, ran = [], rt.executor.next_router

            def counted(layer, x, ran=ran, asked=asked):
                out = ran(layer, x)
                asked.append(out is not None)
                return out

            rt.executor.next_router = counted
            out = rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=6)
            assert asked and any(asked) != paired    # paired: only the last MoE layer asks (no next layer)
            d = rt.stats.to_dict()
            runs.append((out, {k: d[k] for k in ("pairs", "hits", "misses", "drops", "understudies", "loads",
                                                 "prefetch_issued", "prefetch_used")}))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][1]["prefetch_issued"] > 0 and sum(runs[0][1]["understudies"].values()) > 0
    for policy, kw in (("lru", {}), ("smoe", {"lossless": True})):
        with Runtime.load(fixture_model, policy=policy, cache=4, **kw) as rt:
            assert all(b.paired is None for b in rt.lm.blocks.values())


def test_slot_rows_order_pairs_by_slot():
    """`slot_rows`, a grouped call's rows over cache slots: each expert's pair rows in slot order with their tokens,
    and grouped_mm's offsets (cumulative rows per slot, empty slots included), as the rule written in Python."""
    from runtime.expert_compute import slot_rows

    rng = np.random.default_rng(0)
    for _ in range(50):
        n_slots = int(rng.integers(1, 12))
        slots = rng.permutation(n_slots)[:int(rng.integers(0, n_slots + 1))]
        sizes = rng.integers(1, 4, size=len(slots))
        spans = np.stack([np.cumsum(sizes) - sizes, np.cumsum(sizes)], axis=1).astype(np.int64).reshape(-1, 2)
        tok = rng.integers(0, 5, size=int(sizes.sum()))
        host, offs = slot_rows(slots.astype(np.int64), spans, tok, n_slots)
        rows = [p for s, (a, b) in sorted(zip(slots.tolist(), spans.tolist())) for p in range(a, b)]
        per_slot = dict(zip(slots.tolist(), sizes.tolist()))
        assert host.tolist() == rows + tok[rows].tolist()
        assert offs.dtype == np.int32
        assert offs.tolist() == np.cumsum([per_slot.get(s, 0) for s in range(n_slots)]).tolist()
