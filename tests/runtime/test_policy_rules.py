"""The decision rules alone, on hand-made score tables."""
import random

import pytest

from runtime.policy.eviction import ScoreWindow, lru_victim, score_victim
from runtime.policy.host_split import CostMeter, split_misses
from runtime.policy.substitution import (SubstitutionParams, best_first, decide_layer, decide_token, kth_next,
                                         top_score_set)

# 8 experts, k = 2, dyadic scores so band edges are exact. S(k+1) = 0.25 (expert 2).
SCORES = [0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625, 0.15625, 0.09375]
CHOSEN = [0, 1]


def test_kth_next_and_top_set():
    assert kth_next(SCORES, 2) == 0.25
    assert top_score_set(SCORES, CHOSEN, alpha=0.5) == {0}          # 0.375 = 1.5 * 0.25: not above, low-score
    assert top_score_set(SCORES, CHOSEN, alpha=0.25) == {0, 1}      # 0.375 > 0.3125: top-score


def test_band_edges():
    p = SubstitutionParams(alpha=0.5)                               # low-score (0.25, 0.375]; pool (0.125, 0.25]
    d = decide_token(SCORES, CHOSEN, cached={0, 4, 6}, batch_top=set(), params=p)
    # expert 1 sits on the upper edge: low-score, replaced by the best cached pool member, 6 (0.15625);
    # 4 (0.125) sits exactly on the lower edge, which is excluded
    assert d.exact == [0] and d.understudy == {1: (6, "band")}
    d = decide_token(SCORES, CHOSEN, cached={0, 4}, batch_top=set(), params=p)
    assert d.understudy == {} and d.exact == [0, 1]                  # pool empty: 1 is loaded
    d = decide_token(SCORES, CHOSEN, cached={0, 3, 6}, batch_top=set(), params=p)
    assert d.understudy == {1: (3, "band")}                          # the highest-scoring pool member wins


def test_alpha_zero_is_exact():
    p = SubstitutionParams(alpha=0.0)
    d = decide_token(SCORES, CHOSEN, cached={3}, batch_top=set(), params=p)
    assert d.exact == CHOSEN and not d.understudy and not d.dropped


def test_cached_low_score_expert_is_kept():
    d = decide_token(SCORES, CHOSEN, cached={1, 3}, batch_top=set(), params=SubstitutionParams(alpha=0.5))
    assert d.exact == [0, 1] and not d.understudy                    # 0 top-score (loaded), 1 cached


def test_pool_exhaustion():
    scores = [0.30, 0.21, 0.205, 0.20, 0.19, 0.18, 0.0, 0.0]          # k = 3, S(k+1) = 0.20
    d = decide_token(scores, [0, 1, 2], cached={4}, batch_top=set(), params=SubstitutionParams(alpha=0.5))
    # 0 is top-score (0.30 > 0.30? no: 0.30 = 1.5 * 0.20 -> low-score too); misses 0, 1, 2 by score; one pool member
    assert d.understudy == {0: (4, "band")} and sorted(d.exact) == [1, 2]


def test_batch_understudy():
    p = SubstitutionParams(alpha=0.5)
    d = decide_token(SCORES, CHOSEN, cached={0}, batch_top={3}, params=p)
    assert d.understudy == {1: (3, "batch")}
    d = decide_token(SCORES, CHOSEN, cached={0}, batch_top={3}, params=SubstitutionParams(alpha=0.5, use_batch=False))
    assert d.understudy == {}


def test_decide_layer_uses_other_rows_top_sets():
    rows = [SCORES, [0.0, 0.0, 0.0, 0.60, 0.0, 0.0, 0.30, 0.10]]
    chosen = [CHOSEN, [3, 6]]
    ds = decide_layer(rows, chosen, cached={0}, params=SubstitutionParams(alpha=0.5))
    assert ds[0].understudy == {1: (3, "batch")}                     # row 1's top-score expert 3 stands in
    assert sorted(ds[1].exact) == [3, 6]


def test_protected_and_drop():
    p = SubstitutionParams(alpha=0.5, protected=frozenset({1}))
    assert decide_token(SCORES, CHOSEN, cached={0, 3}, batch_top=set(), params=p).exact == [0, 1]
    p = SubstitutionParams(alpha=0.5, by_error=True, drop_ok=frozenset({1}))
    d = decide_token(SCORES, CHOSEN, cached={0}, batch_top=set(), params=p)
    assert d.dropped == [1] and not d.understudy                     # no stand-in cached: left out, not loaded
    p = SubstitutionParams(alpha=0.5, by_error=True, drop_ok=frozenset({1}), pool_depth=0)
    d = decide_token(SCORES, CHOSEN, cached={0, 3}, batch_top=set(), params=p)
    assert d.dropped == [1] and not d.understudy                     # depth 0: the plan drops instead


def test_pool_depth_keeps_only_the_next_router_choices():
    scores = [0.30, 0.20, 0.0, 0.18, 0.0, 0.0, 0.0, 0.12]           # chosen 0, 1; inactive by score: 3, 7
    p = SubstitutionParams(alpha=0.5, pool_depth=1)
    assert decide_token(scores, [0, 1], cached={0, 7}, batch_top=set(), params=p).exact == [0, 1]
    assert decide_token(scores, [0, 1], cached={0, 3}, batch_top=set(), params=p).understudy == {1: (3, "band")}
    p = SubstitutionParams(alpha=0.5, pool_depth=2)
    assert decide_token(scores, [0, 1], cached={0, 7}, batch_top=set(), params=p).understudy == {1: (7, "band")}


def test_plan_prefers_least_error_and_similarity():
    err = {1: {3: 0.9, 7: 0.2}}
    p = SubstitutionParams(alpha=0.5, by_error=True, error=err, similar={1: [(7, 0.2)]})
    d = decide_token(SCORES, CHOSEN, cached={0, 3, 7}, batch_top=set(), params=p)
    assert d.understudy == {1: (7, "similarity")}                    # a profiled near-twin comes first
    p = SubstitutionParams(alpha=0.5, by_error=True, error={1: {3: 0.5, 7: 0.6}}, similar={})
    assert decide_token(SCORES, CHOSEN, cached={0, 3, 7}, batch_top=set(), params=p).understudy == {1: (3, "band")}


def test_lru_and_score_eviction_order():
    assert lru_victim([3, 5, 7], {3: 10, 5: 2, 7: 9}) == 5
    assert lru_victim([3, 5], {}) == 3
    w = ScoreWindow(num_experts=4, n=2)
    w.push({0: 0.1, 1: 0.5, 2: 0.2})
    w.push({0: 0.1, 2: 0.2, 3: 0.4})
    assert w.mean() == pytest.approx([0.1, 0.25, 0.2, 0.2])
    assert score_victim([1, 2, 3], w.mean()) == 2                     # ties broken by id
    w.push({0: 0.9})                                                  # the oldest step leaves the window
    assert w.mean()[1] == pytest.approx(0.0) and score_victim([0, 1, 2, 3], w.mean()) == 1



def test_score_window_means_are_the_sums_over_the_held_steps():
    """The window's means, updated only for the experts of the steps pushed and dropped since the last read, are
    every expert's running sum / steps held, bit for bit, whether read after every push, now and then, or never for
    longer than the window."""
    import random

    rng = random.Random(0)
    for n, reads in [(1, 1.0), (3, 1.0), (4, 0.3), (16, 0.05)]:
        w = ScoreWindow(num_experts=12, n=n)
        for _ in range(200):
            w.push({e: rng.random() for e in rng.sample(range(12), rng.randint(0, 5))})
            if rng.random() < reads:
                m = max(len(w._steps), 1)
                assert w.mean() == [s / m for s in w._sum]

def test_host_transfer_split():
    assert split_misses([5, 6, 7, 8], c_load=1.0, c_host=1.0) == ([5, 6], [7, 8])
    assert split_misses([5, 6, 7, 8], c_load=1.0, c_host=3.0) == ([5, 6, 7], [8])
    assert split_misses([5, 6, 7], c_load=10.0, c_host=1.0) == ([], [5, 6, 7])
    assert split_misses([], 1.0, 1.0) == ([], [])
    m = CostMeter(p=2, prior=5.0)
    assert m.value == 5.0
    for v in (1.0, 2.0, 4.0):
        m.add(v)
    assert m.value == 3.0
    m.add(0.5, n=3)                      # a run of three copies timed as one span: the last p are its
    assert m.value == 0.5
    m.add(1.5)
    assert m.value == 1.0


def test_counts_add_every_counter():
    """Adding a schedule's Counts (the fast path) and adding a subclass's counters (the general one) both sum every
    shared counter, dicts by key."""
    from dataclasses import fields

    from runtime.policy.counts import Counts
    from runtime.stats import LayerCounters

    a = Counts(pairs=8, hits=3, misses=2, host=1, drops=1, loads=4, prefetch_issued=2, prefetch_used=1,
               understudies={"band": 1, "similarity": 0, "batch": 0}, quantized={"int4": 3})
    for total in (Counts(), LayerCounters(load_bytes=5)):
        total.add(a)
        total.add(a)
        for f in fields(Counts):
            v = getattr(a, f.name)
            assert getattr(total, f.name) == ({r: 2 * n for r, n in v.items()} if isinstance(v, dict) else 2 * v)
    b = LayerCounters(pairs=2, load_bytes=7, quantized={"int8": 1})
    total.add(b)                                   # the general path: a subclass's extra counter too
    assert total.pairs == 18 and total.load_bytes == 12 and total.quantized == {"int4": 6, "int8": 1}


def test_best_first_is_the_score_order_with_ties_by_id():
    """`best_first` (two C sorts) orders as the reference's key (-score, e), ties and zeros included."""
    rng = random.Random(1)
    for _ in range(200):
        ids = rng.sample(range(64), rng.randint(0, 20))
        score = {e: rng.choice([0.0, 0.25, 0.5, rng.random()]) for e in ids}
        assert best_first(ids, score.__getitem__) == sorted(ids, key=lambda e: (-score[e], e))
