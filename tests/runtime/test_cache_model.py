"""The cache model alone: pinning, eviction order, the order of a layer call's operations, prefetch."""
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.policy.schedule import CacheModel


def _model(policy="lru", slots=2, **kw):
    pol = preset(policy, host_compute=False, **kw)
    return CacheModel({0: slots, 1: slots}, num_experts=8, top_k=2, policy=pol,
                      params=substitution_params(pol, [0, 1]))


def row(*pairs):
    return dict(pairs)


def test_loads_issued_before_cached_compute_and_pinning():
    m = _model(slots=3)
    m.schedule(0, [row((1, .5), (2, .3), (3, .1))], [[1, 2]])          # loads 1 and 2
    s = m.schedule(0, [row((2, .5), (4, .3), (5, .1))], [[2, 4]])      # 2 cached, 4 missing
    kinds = [(k, e) for k, _, e, _ in s.ops]
    assert kinds == [("load", 4), ("compute", 2), ("compute", 4)]      # the load goes first, cached compute overlaps it
    assert s.counts.hits == 1 and s.counts.misses == 1 and s.counts.loads == 1
    s = m.schedule(0, [row((5, .5), (6, .3), (1, .1))], [[5, 6]])      # cache {1, 2, 4} full: two victims needed
    victims = [v for k, _, _, v in s.ops if k == "load"]
    assert victims == [1, 2]                                           # least recently used first; 5, 6 pinned


def test_cache_smaller_than_the_layer_needs_loads_in_waves():
    m = _model(slots=1)
    s = m.schedule(0, [row((1, .5), (2, .3), (3, .1))], [[1, 2]])
    kinds = [(k, e, v) for k, _, e, v in s.ops]
    # one slot: load 1, compute 1 (unpins it), then 2 evicts 1
    assert kinds == [("load", 1, None), ("compute", 1, None), ("load", 2, 1), ("compute", 2, None)]
    assert len(m.resident[0]) == 1


def test_score_eviction_keeps_good_substitutes():
    m = _model("smoe", slots=2, prefetch=False)
    for _ in range(3):   # expert 3 scores well every step though never chosen
        m.schedule(0, [row((1, .4), (2, .3), (3, .25))], [[1, 2]])
    m.schedule(0, [row((3, .4), (1, .3), (2, .05))], [[3, 1]])       # 3 enters, evicting 2 (lower mean score)
    assert m.resident[0] == {1, 3}


def test_prefetch_into_next_layer():
    m = _model("smoe", slots=2, prefetch=True)
    s = m.schedule(0, [row((1, .6), (2, .3), (3, .1))], [[1, 2]], prediction=[row((5, .7), (6, .2), (7, .1))])
    # both predicted experts clear (1 + alpha) * S(k+1) = 0.13: both are prefetched into layer 1's free slots
    assert [op for op in s.ops if op[0] == "prefetch"] == [("prefetch", 1, 5, None), ("prefetch", 1, 6, None)]
    s = m.schedule(1, [row((5, .6), (6, .3), (7, .1))], [[5, 6]])
    assert s.counts.hits == 2 and s.counts.prefetch_used == 2 and s.counts.loads == 0


def test_lossless_never_substitutes():
    m = _model("smoe", slots=2, lossless=True, prefetch=False)
    for t in range(20):
        s = m.schedule(0, [row(((t % 8), .4), ((t + 3) % 8, .35), ((t + 5) % 8, .3))], [[t % 8, (t + 3) % 8]])
        assert not any(d.understudy or d.dropped for d in s.decisions)
