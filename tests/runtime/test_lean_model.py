"""The lean cache model (runtime.policy.lean) decides exactly as the reference CacheModel for every policy it runs:
substitution (smoe, plan with near-twins, protected experts, drops, pool depth), score eviction, prefetch with and
without the guard, the host/transfer split, static's pinned experts, precision pools; on random and recorded traces,
op for op, with the same state after every call, direct calls and those whose loads wait for computes alike."""
import numpy as np
import pytest

from runtime.policy.config import preset
from runtime.policy.fast import make_cache_model
from runtime.policy.lean import LeanCacheModel, decide_lean
from runtime.policy.plan_params import substitution_params
from runtime.policy.pools import Pools
from runtime.policy.schedule import CacheModel
from runtime.policy.static import static_pins
from runtime.policy.substitution import SubstitutionParams, decide_layer

LAYERS = (0, 1, 2)


def _plan_params(rng, e, alpha=0.3, pool_depth=None, use_batch=True):
    """Plan parameters with random near-twins (some above tau, so only `error` knows them), protected experts and
    drops, per layer."""
    out = {}
    for l in LAYERS:
        similar, error = {}, {}
        for i in range(e):
            js = [int(j) for j in rng.choice(e, size=int(rng.integers(0, 4)), replace=False) if j != i]
            errs = rng.random(len(js))
            error[i] = dict(zip(js, errs.tolist()))
            similar[i] = [(j, float(x)) for j, x in zip(js, errs) if x <= 0.6]
        out[l] = SubstitutionParams(alpha=alpha, use_batch=use_batch, by_error=True, pool_depth=pool_depth,
                                    similar=similar, error=error,
                                    protected=frozenset(rng.choice(e, size=e // 8, replace=False).tolist()),
                                    drop_ok=frozenset(rng.choice(e, size=e // 3, replace=False).tolist()))
    return out


def _rows(rng, batch, e, k, p):
    """Per token a top-2k score dict (ties, zeros, and sometimes a chosen expert that is not in the top k, as a
    biased router chooses) and its k chosen experts."""
    rows, chosen = [], []
    for _ in range(batch):
        ids = rng.choice(e, size=min(2 * k, e), replace=False, p=p)
        s = np.sort(rng.random(len(ids)))[::-1].copy()
        s[rng.random(len(s)) < 0.15] = s[0]
        s[rng.random(len(s)) < 0.05] = 0.0
        ch = [int(i) for i in ids[:k]]
        if rng.random() < 0.1:
            ch[-1] = int(ids[-1])
        rows.append({int(i): float(v) for i, v in zip(ids, s)})
        chosen.append(ch)
    return rows, chosen


def _state(m):
    return (m.resident, m.last_used, m.uses, m.prefetched, m.calls, m.held,
            {l: w._sum for l, w in m.windows.items()}, {l: len(w._steps) for l, w in m.windows.items()})


CASES = {   # name: (policy, plan-style params, pinned, pools)
    "smoe": (preset("smoe"), False, False, False),
    "smoe-no-batch": (preset("smoe", use_batch=False, prefetch_max=3), False, False, False),
    "plan": (preset("plan"), True, False, False),
    "plan-depth": (preset("plan", pool_depth=2), True, False, False),
    "plan-alpha-1": (preset("plan", alpha=1.0), True, False, False),
    "plan-lossless": (preset("plan", lossless=True), False, False, False),
    "plan-pools": (preset("plan"), True, False, True),
    "lru-prefetch-host": (preset("lru", prefetch=True, host_compute=True), False, False, False),
    "lfu-host": (preset("lfu", host_compute=True), False, False, False),
    "lfru-prefetch": (preset("lfru", prefetch=True), False, False, False),
    "lru-pools": (preset("lru"), False, False, True),
    "static": (preset("static"), False, True, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("e,k", [(16, 4), (64, 6)])
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_model_decides_as_the_cache_model(case, e, k, batch, monkeypatch):
    pol, plan_style, pinned, pooled = CASES[case]
    rng = np.random.default_rng(abs(hash((case, e, k, batch))) % 2**32)
    params = (_plan_params(rng, e, pol.alpha, pol.pool_depth, pol.use_batch) if plan_style
              else substitution_params(pol, list(LAYERS)))
    weights = np.ones(e)
    weights[rng.choice(e, size=k + 2, replace=False)] = 8.0
    p = weights / weights.sum()
    streamed = []
    real = LeanCacheModel._stream

    def counting(self, *a, **kw):
        streamed.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(LeanCacheModel, "_stream", counting)
    calls = 0
    for slots in sorted({1 + pinned, k - 1, k, k + 1, e // 4, e // 2, e - 1}):
        kw = {}
        if pinned:
            kw["pinned"] = static_pins({l: rng.random(e).tolist() for l in LAYERS}, {l: slots for l in LAYERS})
        if pooled:
            of = {l: tuple(int(x) for x in rng.integers(0, 2, e)) for l in LAYERS}
            kw["pools"] = Pools(("bfloat16", "int4"), (100, 28), of, {l: (max(1, slots // 2), slots) for l in LAYERS})
        initial = {l: rng.choice(e, size=slots, replace=False).tolist() for l in LAYERS} if slots % 2 else None
        ref = CacheModel({l: slots for l in LAYERS}, e, k, pol, params, initial=initial, **kw)
        lean = LeanCacheModel({l: slots for l in LAYERS}, e, k, pol, params, initial=initial, **kw)
        if pinned or pooled or pol.eviction != "score":           # the runtime's choice, too
            assert type(make_cache_model({l: slots for l in LAYERS}, e, k, pol, params, initial=initial,
                                         **kw)) is LeanCacheModel
        assert _state(lean) == _state(ref)
        for n in range(24):
            layer = LAYERS[n % len(LAYERS)]
            rows, chosen = _rows(rng, batch, e, k, p)
            pred = _rows(rng, batch, e, k, p)[0] if rng.random() < 0.8 else None
            c_load, c_host = float(rng.choice([0.5, 1.0, 3.0])), float(rng.choice([0.5, 1.0, 3.0]))
            a = ref.schedule(layer, rows, chosen, pred, c_load, c_host)
            b = lean.schedule(layer, rows, chosen, pred, c_load, c_host)
            assert b.ops == a.ops, (slots, n)
            assert b.counts == a.counts, (slots, n)
            assert b.decisions == a.decisions, (slots, n)
            assert _state(lean) == _state(ref), (slots, n)
            calls += 1
    assert len(streamed) < calls                       # most calls were direct
    if batch == 3 and not pinned:
        assert streamed                                # and some (misses outnumber the free slots) streamed


def test_lean_decisions_equal_the_rule():
    """decide_lean over random batches equals substitution.decide_layer, alpha from 0 to 1, with and without
    batch-top understudies, pool depth, near-twins, protected experts and drops."""
    rng = np.random.default_rng(3)
    e, k = 32, 4
    p = np.ones(e) / e
    for alpha in (0.0, 0.1, 0.3, 0.7, 1.0):
        for use_batch in (True, False):
            for depth in (None, 1, 3):
                params = _plan_params(rng, e, alpha, depth, use_batch)[0]
                for plain in (False, True):
                    if plain:
                        params = SubstitutionParams(alpha=alpha, use_batch=use_batch, pool_depth=depth)
                    for _ in range(40):
                        rows, chosen = _rows(rng, int(rng.integers(1, 5)), e, k, p)
                        cached = set(rng.choice(e, size=int(rng.integers(0, e)), replace=False).tolist())
                        assert decide_lean(rows, chosen, cached, params) == decide_layer(rows, chosen, cached, params)


def test_lean_model_on_a_recorded_trace(small_profile):
    """The routing and next-layer prediction the profiler recorded on the shared fixture, through smoe and plan: the
    lean and the compiled model decide as the reference."""
    from artifacts import Profile

    prof = Profile.load(small_profile)
    layers, e, k = prof.moe_layers, prof.num_experts, prof.top_k
    tr = prof.trace
    ids, scores = tr["ids"][:36], tr["scores"][:36]                         # [T, M, W]
    pids, pscores = tr["pred_ids"][:36], tr["pred_scores"][:36]
    for name in ("smoe", "plan"):
        pol = preset(name)
        params = substitution_params(pol, layers)
        for slots in (k, e // 2):
            ref = CacheModel({l: slots for l in layers}, e, k, pol, params)
            lean = LeanCacheModel({l: slots for l in layers}, e, k, pol, params)
            fast = make_cache_model({l: slots for l in layers}, e, k, pol, params)     # the compiled model
            for start in range(0, len(ids), 2):                             # calls of 2 tokens, layer by layer
                for m, l in enumerate(layers):
                    sl = slice(start, start + 2)
                    rows = [dict(zip(a, b)) for a, b in zip(ids[sl, m].tolist(), scores[sl, m].tolist())]
                    pred = [dict(zip(a, b)) for a, b in zip(pids[sl, m].tolist(), pscores[sl, m].tolist())]
                    chosen = [a[:k] for a in ids[sl, m].tolist()]
                    a = ref.schedule(l, rows, chosen, pred)
                    b = lean.schedule(l, rows, chosen, pred)
                    c = fast.schedule(l, rows, chosen, pred)
                    assert (b.ops, b.counts, b.decisions) == (a.ops, a.counts, a.decisions)
                    assert (c.ops, c.counts, c.decisions) == (a.ops, a.counts, a.decisions)
                    assert _state(lean) == _state(ref)
                    assert _compiled_state(fast) == _ref_state(ref)


def test_score_rows_are_the_top_view():
    """The runtime's per-token rows (`score_rows`) are the trace's tensor view (`top_view`): the same experts in the
    same order with the same scores, with tied scores, zero scores and chosen experts outside the top k."""
    import torch

    from runtime.router import Routing, score_rows, top_view

    g = torch.Generator().manual_seed(0)
    for t_n, e, k in [(1, 8, 2), (3, 128, 8), (5, 16, 4)]:
        for trial in range(20):
            score = torch.rand(t_n, e, generator=g)
            score[torch.rand(t_n, e, generator=g) < 0.3] = 0.0                    # ties at zero
            score[:, :3] = score[:, :1]                                           # ties among the best
            idx = torch.topk(score, k, dim=1).indices
            if trial % 3 == 0:                                                    # a biased router's choice
                idx[:, -1] = torch.argmin(score, dim=1)
            r = Routing(idx=idx, weights=torch.ones(t_n, k), score=score, coef=torch.ones(t_n), gate=score)
            for width in (k, 2 * k):
                ids, sc = top_view(r, width)
                rows, chosen = score_rows(r, width)
                assert chosen == idx.tolist()
                assert [list(row.items()) for row in rows] == [list(zip(a, b)) for a, b in
                                                               zip(ids.tolist(), sc.tolist())]


def _compiled_state(m):
    return m.resident, m.prefetched, m.window_sums(), {l: int(m.held[i]) for i, l in enumerate(m.layers)}


def _ref_state(m):
    return m.resident, m.prefetched, {l: w._sum for l, w in m.windows.items()}, {l: len(w._steps) for l, w in m.windows.items()}


COMPILED = sorted(c for c, (pol, _, pinned, pooled) in CASES.items() if pol.eviction == "score" and not pooled)


@pytest.mark.parametrize("case", COMPILED + ["smoe-window-2"])
@pytest.mark.parametrize("e,k", [(16, 4), (64, 6)])
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_model_decides_as_the_cache_model(case, e, k, batch):
    """The compiled model (runtime.policy.compiled) of the score-evicting policies: the reference's ops, counts,
    decisions and state after every call, from score dicts (`schedule`) and from the router's arrays
    (`schedule_table`, the runtime's path: rows made as `score_rows` makes them)."""
    import torch

    from runtime.policy.compiled import CompiledCacheModel
    from runtime.router import Routing, score_rows

    pol, plan_style, _, _ = CASES.get(case, (preset("smoe", window=2), False, False, False))
    rng = np.random.default_rng(abs(hash(("compiled", case, e, k, batch))) % 2**32)
    params = (_plan_params(rng, e, pol.alpha, pol.pool_depth, pol.use_batch) if plan_style
              else substitution_params(pol, list(LAYERS)))
    weights = np.ones(e)
    weights[rng.choice(e, size=k + 2, replace=False)] = 8.0
    p = weights / weights.sum()
    for slots in sorted({k - 1, k, k + 1, e // 4, e // 2, e - 1}):
        initial = {l: rng.choice(e, size=slots, replace=False).tolist() for l in LAYERS} if slots % 2 else None
        ref = CacheModel({l: slots for l in LAYERS}, e, k, pol, params, initial=initial)
        fast = make_cache_model({l: slots for l in LAYERS}, e, k, pol, params, initial=initial)
        assert type(fast) is CompiledCacheModel
        for n in range(24):
            layer = LAYERS[n % len(LAYERS)]
            c_load, c_host = float(rng.choice([0.5, 1.0, 3.0])), float(rng.choice([0.5, 1.0, 3.0]))
            if n % 2:                                    # score dicts
                rows, chosen = _rows(rng, batch, e, k, p)
                pred = _rows(rng, batch, e, k, p)[0] if rng.random() < 0.8 else None
                b = fast.schedule(layer, rows, chosen, pred, c_load, c_host)
            else:                                        # a routing: score table and chosen
                rt = []
                for _ in range(2):
                    score = torch.from_numpy(rng.random((batch, e)).astype(np.float32))
                    score[torch.from_numpy(rng.random((batch, e)) < 0.2)] = 0.0
                    score[:, 1:3] = score[:, :1]
                    if n % 3 == 0:                       # coarse scores: ties at the edge of the top W
                        score = torch.round(score * 4) / 4
                    idx = torch.topk(score, k, dim=1).indices
                    if rng.random() < 0.2:
                        idx[:, -1] = torch.argmin(score, dim=1)
                    rt.append(Routing(idx=idx, weights=torch.ones(batch, k), score=score, gate=score))
                rows, chosen = score_rows(rt[0], 2 * k)
                pred = score_rows(rt[1], 2 * k)[0] if n % 4 else None
                arrays = [(r.idx.numpy(), r.score.numpy()) for r in rt]
                b = fast.schedule_table(layer, *arrays[0], 2 * k, arrays[1] if pred is not None else None, c_load,
                                        c_host)
            a = ref.schedule(layer, rows, chosen, pred, c_load, c_host)
            assert b.ops == a.ops, (slots, n)
            assert b.counts == a.counts, (slots, n)
            assert b.decisions == a.decisions, (slots, n)
            assert _compiled_state(fast) == _ref_state(ref), (slots, n)
            _assert_scratch_clean(fast)


def _assert_scratch_clean(model):
    """The compiled kernel's per-expert scratch is zero between calls, and each window step's nonzero scores are
    among the experts it lists (what it subtracts when the step leaves)."""
    assert not model.ws.any()
    for li in range(len(model.layers)):
        for s in range(model.ring.shape[1]):
            listed = set(model.ring_ids[li, s, 1:1 + model.ring_ids[li, s, 0]].tolist())
            assert set(np.flatnonzero(model.ring[li, s]).tolist()) <= listed


def test_a_failed_compiled_call_leaves_its_scratch_zero():
    """A call for which no slot can be freed (a layer of no slots) raises as the reference does, and the kernel's
    scratch is zero after it: the next call decides from clean state."""
    from runtime.policy.compiled import CompiledCacheModel

    e, k = 16, 4
    pol = preset("smoe")
    params = substitution_params(pol, list(LAYERS))
    model = CompiledCacheModel({0: 0, 1: 4, 2: 4}, e, k, pol, params)
    ref = CacheModel({0: 0, 1: 4, 2: 4}, e, k, pol, params)
    rng = np.random.default_rng(5)
    rows, chosen = _rows(rng, 2, e, k, None)
    for m in (ref, model):
        with pytest.raises(RuntimeError, match="no slot can be freed"):
            m.schedule(0, rows, chosen, rows)
    _assert_scratch_clean(model)
    assert model.schedule(1, rows, chosen, rows).ops == ref.schedule(1, rows, chosen, rows).ops
    _assert_scratch_clean(model)


def _reference_groups(chosen, decisions, w, coef, gate, mode):
    """The served pairs by the rule, in plain Python: per serving expert in ascending id, its own exact pairs in
    (position, token) order, then the tokens it stands in for in token order, each with its weight (the routing's;
    an understudy's own, coef x gate_j rounded to float32, or the replaced expert's); (tok, span, weights)."""
    pairs = {}
    for p in range(len(chosen[0])):
        for t, d in enumerate(decisions):
            if chosen[t][p] in d.exact:
                pairs.setdefault(chosen[t][p], []).append((t, w[t][p]))
    for t, d in enumerate(decisions):
        for i, (j, reason) in d.understudy.items():
            replaced = mode == "replaced" or (mode == "auto" and reason == "similarity")
            v = w[t][chosen[t].index(i)] if replaced else float(np.float32(coef[t] * gate[t][j]))
            pairs.setdefault(j, []).append((t, v))
    tok, wt, span = [], [], {}
    for e in sorted(pairs):
        span[e] = (len(tok), len(tok) + len(pairs[e]))
        tok += [t for t, _ in pairs[e]]
        wt += [v for _, v in pairs[e]]
    return tok, span, wt


@pytest.mark.parametrize("mode", ["own", "replaced", "auto"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_served_groups_follow_the_rule(mode, batch):
    """The executor's grouping of served pairs (a compiled kernel) equals the rule written in plain Python: the same
    rows, spans, and weights bit for bit (bfloat16 routing weights; understudies at their own or the replaced weight,
    drops), and the same mixed output; made in the compiled model's call (`schedule_and_group`, the runtime's path),
    from its schedule's arrays and from the same schedule's decisions (`group_served`, `decision_arrays`: the lean
    model's path). A call whose every pair is exact is grouped as `group_pairs` groups it. Handed the float32 weights
    before their cast to bfloat16 (what a paired router gives, `runtime.router.PairedRouting`), the call rounds them
    itself and groups bit for bit as from the cast weights (a twin model takes those)."""
    import torch

    from runtime.expert_compute import group_pairs, group_served, schedule_and_group
    from runtime.policy.compiled import CompiledCacheModel, decision_arrays
    from runtime.router import Routing

    e, k = 32, 4
    rng = np.random.default_rng(batch)
    pol = preset("plan", understudy_weight=mode)
    params = _plan_params(rng, e, pol.alpha, None, True)
    model, twin = (CompiledCacheModel({l: e // 4 for l in LAYERS}, e, k, pol, params) for _ in range(2))
    g = torch.Generator().manual_seed(batch)
    seen = exact = 0
    for n in range(60):
        logits = torch.randn(batch, e, generator=g)
        gate = torch.softmax(logits, -1)
        w, idx = torch.topk(gate, k)
        w32 = w / w.sum(-1, keepdim=True)
        r = Routing(idx=idx, weights=w32.to(torch.bfloat16), score=gate, gate=gate)
        chosen = idx.numpy()
        x = torch.randn(batch, 8, generator=g).to(torch.bfloat16)
        s, fused = schedule_and_group(model, LAYERS[n % 3], x, (chosen, gate.numpy()), None,
                                      r.weights.float().numpy(), gate.numpy(), r.weights.dtype, 2 * k, mode)
        s2, fused2 = schedule_and_group(twin, LAYERS[n % 3], x, (chosen, gate.numpy()), None, w32.numpy(),
                                        gate.numpy(), r.weights.dtype, 2 * k, mode)
        assert s2.flat_ops == s.flat_ops and s2.count_array == s.count_array
        assert fused2.tok.tolist() == fused.tok.tolist() and torch.equal(fused2.weights, fused.weights)
        if not s.substituted:
            exact += 1
            p = group_pairs(x, chosen, r.weights)
            assert fused.tok.tolist() == p.tok.tolist() and fused.span == p.span and fused.whole == p.whole
            assert torch.equal(fused.weights, p.weights)
            if batch > 1:                        # (one token's rank order is its pair order, either way)
                assert fused.by_token.tolist() == p.by_token.tolist()
            continue
        seen += 1
        tok, span, wt = _reference_groups(idx.tolist(), s.decisions, r.weights.float().tolist(), r.coef.tolist(),
                                          gate.tolist(), mode)
        ys = {ex_: torch.randn(hi - lo, 8, generator=g).to(torch.bfloat16) for ex_, (lo, hi) in span.items()}
        outs = []
        for b in (fused, *(group_served(x, chosen, *arrays, r.weights, r.gate, mode) for arrays in (
                (s.chosen_order, s.action, s.understudy), decision_arrays(s.decisions, chosen)))):
            assert b.tok.tolist() == tok and b.span == span and b.whole == (batch == 1)
            assert torch.equal(b.weights, torch.tensor(wt, dtype=torch.float32).to(torch.bfloat16))
            outs.append(b.mix(x, ys))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert seen >= 10 and exact >= 3



@pytest.mark.parametrize("batch", [1, 3, 5])
def test_the_pair_kernel_takes_the_halves(batch):
    """Paired routers' routing and prediction handed to the compiled model as their shared arrays (`pair_arrays`,
    `schedule_and_group_pair`: the kernel takes each half itself) decide and group as the two routings handed apart
    (`call_arrays`, `schedule_and_group`), on a twin model: the same ops, counts, decisions and state after every call,
    and the same groups bit for bit (float32 and bfloat16 weights; views on the host and one copy)."""
    import torch

    from runtime.expert_compute import schedule_and_group, schedule_and_group_pair
    from runtime.families.arch import RouterRule
    from runtime.policy.compiled import CompiledCacheModel
    from runtime.router import PairedRouting, call_arrays, pair_arrays, route_pair_logits

    e, k = 32, 4
    rng = np.random.default_rng(batch)
    pol = preset("plan", understudy_weight="auto")
    params = _plan_params(rng, e, pol.alpha, None, True)
    paired, apart = (CompiledCacheModel({l: e // 4 for l in LAYERS}, e, k, pol, params) for _ in range(2))
    g = torch.Generator().manual_seed(batch)
    seen = 0
    for n in range(60):
        dtype = (torch.float32, torch.bfloat16)[n % 2]
        r, p = route_pair_logits((torch.randn(batch, 2 * e, generator=g) * 2).to(dtype), RouterRule(), k)
        assert isinstance(r, PairedRouting) and pair_arrays(r, None) is None
        layer, x = LAYERS[n % 3], torch.randn(batch, 8, generator=g).to(r.weights_dtype)
        s, got = schedule_and_group_pair(paired, layer, x, pair_arrays(r, p, one_copy=bool(n % 3 == 2)),
                                         r.weights_dtype, 2 * k, "auto", 1.0, 2.0)
        s2, want = schedule_and_group(apart, layer, x, *call_arrays(r, p), r.weights_dtype, 2 * k, "auto", 1.0, 2.0)
        assert s.flat_ops == s2.flat_ops and s.count_array == s2.count_array and s.end == s2.end, n
        for f in ("chosen_order", "action", "understudy"):
            assert np.array_equal(getattr(s, f), getattr(s2, f)), (n, f)
        assert got.tok.tolist() == want.tok.tolist() and got.span == want.span and got.whole == want.whole
        assert got.weights.dtype == r.weights_dtype and torch.equal(got.weights, want.weights), n
        assert (got.by_token is None) == (want.by_token is None)
        assert got.by_token is None or got.by_token.tolist() == want.by_token.tolist()
        assert paired.resident == apart.resident and paired.window_sums() == apart.window_sums()
        seen += s.substituted
    assert seen >= 10

def test_host_arrays_are_the_tensors():
    """A device's routing reaches the host in one copy (`host_arrays`, what `call_arrays` uses off the CPU): the
    same ids and scores as each tensor's own copy, ids as int64, scores float32 bit for bit; `call_arrays` of a
    call's routing (bf16 weights; its gate the score tensor, or another) and its prediction, so copied, equals their
    views."""
    import torch

    from runtime.router import Routing, call_arrays, host_arrays

    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 128, generator=g)
    top = torch.topk(score, 16, dim=1).indices
    w = torch.rand(3, 8, generator=g).to(torch.bfloat16)
    ids, sc, ws = host_arrays(top[:, :8], score, w)
    assert ids.dtype == np.int64 and np.array_equal(ids, top[:, :8].numpy())
    assert sc.dtype == np.float32 and np.array_equal(sc.view(np.int32), score.numpy().view(np.int32))
    assert np.array_equal(ws, w.float().numpy()) and ws.flags.c_contiguous and sc.flags.c_contiguous
    pred = Routing(idx=torch.topk(score.flip(1), 8, dim=1).indices, weights=None, score=score.flip(1).contiguous(),
                   gate=score)
    for gate in (score, score.sqrt()):
        r = Routing(idx=top[:, :8].contiguous(), weights=w, score=score, gate=gate)
        for p in (pred, None):
            views, copied = call_arrays(r, p), call_arrays(r, p, one_copy=True)
            flat = [views[0], views[1] or (), views[2:]]
            assert all(np.array_equal(x, y) and x.dtype == y.dtype
                       for a, b in zip(flat, [copied[0], copied[1] or (), copied[2:]]) for x, y in zip(a, b))
            assert (views[1] is None) == (p is None) and np.array_equal(views[3], gate.numpy())
            assert views[2].dtype == np.float32 and np.array_equal(views[2], w.float().numpy())
