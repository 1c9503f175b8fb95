"""The lossless baselines' rules alone, on hand-made request sequences: lfu, lfru and static in the cache model the
runtime and the simulator share, and Belady's rule (the simulator's oracle) against brute force."""
import itertools
import random
from functools import lru_cache

import pytest

from runtime.policy.config import preset
from runtime.policy.eviction import NextUse, belady_victim, lfru_score, lfru_victim, lfu_victim, lru_victim
from runtime.policy.plan_params import substitution_params
from runtime.policy.schedule import CacheModel
from runtime.policy.static import most_frequent, static_pins


def _model(policy: str, slots: int, experts: int = 8, k: int = 1, pinned=None, future=None, initial=None):
    pol = preset(policy, host_compute=False)
    return CacheModel({0: slots}, num_experts=experts, top_k=k, policy=pol, params=substitution_params(pol, [0]),
                      pinned=pinned, future=future, initial=initial)


def _replay(model: CacheModel, requests: list[list[int]]) -> tuple[int, int, list[int | None]]:
    """(hits, loads, victims) of a layer-0 request sequence (each call's experts scored in the order given)."""
    hits = loads = 0
    victims = []
    for req in requests:
        s = model.schedule(0, [{e: 1.0 - 0.01 * n for n, e in enumerate(req)}], [req])
        hits, loads = hits + s.counts.hits, loads + s.counts.loads
        victims += [v for kind, _, _, v in s.ops if kind == "load"]
    return hits, loads, victims


def test_victim_rules_alone():
    last, uses = {3: 10, 5: 2, 7: 9}, {3: 1, 5: 4, 7: 1}
    assert lru_victim([3, 5, 7], last) == 5
    assert lfu_victim([3, 5, 7], uses, last) == 7                  # fewest uses; 3 and 7 tie, 7 used less recently
    # lfru scores at c = 11: 3 -> 1 / 2, 5 -> 4 / 10, 7 -> 1 / 3: 7 goes first, then 5, then 3
    assert lfru_score(4, 2, 11) == 4 / 10 and lfru_victim([3, 5, 7], uses, last, now=11) == 7
    assert lfru_victim([3, 5], uses, last, now=11) == 5
    assert belady_victim([3, 5, 7], {3: 12, 5: 20}, last) == 7       # never requested again goes first
    assert belady_victim([3, 5], {3: 12, 5: 20}, last) == 5          # then the farthest next request


def test_lfu_keeps_the_frequent_expert_lru_drops():
    seq = [[0], [0], [0], [1], [2], [0]]      # two slots: at 2, lru evicts 0 (least recent), lfu evicts 1 (one use)
    _, _, lru_victims = _replay(m_lru := _model("lru", 2), seq)
    _, _, lfu_victims = _replay(m_lfu := _model("lfu", 2), seq)
    assert lru_victims == [None, None, 0, 1] and lfu_victims == [None, None, 1]
    assert m_lru.resident[0] == {2, 0} and m_lfu.resident[0] == {0, 2}
    assert m_lfu.uses[0] == {0: 4, 2: 1}      # counts since the load; 1's count left with it


def test_lfu_counts_restart_at_each_load():
    m = _model("lfu", 2)
    _replay(m, [[0], [0], [0], [1], [2], [1], [1], [3]])
    # 2 evicts 1 (1 use against 0's 3); 1 comes back evicting 2 (1 use) and is used twice; at 3 the candidates are
    # 0 (3 uses) and 1 (2 uses since its reload, 3 in all): in-cache LFU evicts 1 (perfect LFU would tie, then 0)
    assert m.resident[0] == {0, 3}


def test_lfru_weighs_uses_by_age():
    # three slots; 0 used 3 times long ago, 2 six times just now, 1 once at call 10; 3 arrives at call 11
    seq = [[0]] * 3 + [[2]] * 6 + [[1], [3]]
    _, _, lfru = _replay(m := _model("lfru", 3), seq)
    _, _, lfu = _replay(_model("lfu", 3), seq)
    _, _, lru = _replay(_model("lru", 3), seq)
    # scores at c = 11: 0 -> 3 / (11 - 3 + 1) = 0.33, 1 -> 1 / 2, 2 -> 6 / 3: lfru evicts 0, as lru does; lfu evicts 1
    assert lfru[-1] == 0 and lru[-1] == 0 and lfu[-1] == 1
    assert m.resident[0] == {1, 2, 3}


def test_static_never_evicts_its_pinned_experts():
    freq = {0: [0.1, 0.5, 0.05, 0.3, 0.0, 0.02, 0.03, 0.0]}
    assert most_frequent(freq[0], 3) == [1, 3, 0] and most_frequent([0.2, 0.2, 0.1], 2) == [0, 1]   # ties: lower id
    pins = static_pins(freq, {0: 4})
    assert pins == {0: [1, 3, 0]}                                     # S - 1 pinned, one streaming slot
    assert static_pins(freq, {0: 1}) == {0: []}                      # one slot: nothing pinned
    m = _model("static", 4, k=2, pinned=pins)
    assert m.resident[0] == {0, 1, 3}                                 # resident from the start
    rng = random.Random(0)
    for _ in range(200):
        req = rng.sample(range(8), 2)
        before = set(m.resident[0])
        s = m.schedule(0, [{req[0]: 0.6, req[1]: 0.4}], [req])
        assert {0, 1, 3} <= m.resident[0] and len(m.resident[0]) <= 4
        assert all(v not in (0, 1, 3) for kind, _, _, v in s.ops if kind == "load")
        assert s.counts.hits == len(before & set(req)) >= len({0, 1, 3} & set(req))


def test_static_streams_cold_experts_through_one_slot():
    m = _model("static", 2, k=3, pinned={0: [5]})
    s = m.schedule(0, [{1: .5, 2: .3, 5: .2}], [[1, 2, 5]])
    # 5 is a hit; 1 and 2 share the one streaming slot: load 1, compute it, 2 evicts 1, compute 2
    assert [(k, e, v) for k, _, e, v in s.ops] == [("load", 1, None), ("compute", 5, None), ("compute", 1, None),
                                                    ("load", 2, 1), ("compute", 2, None)]
    assert s.counts.hits == 1 and s.counts.misses == 2 and m.resident[0] == {5, 2}


def test_static_computes_cold_experts_on_the_host_where_cheaper():
    pol = preset("static")                                             # host/transfer split on (a CUDA device)
    m = CacheModel({0: 2}, num_experts=8, top_k=3, policy=pol, params=substitution_params(pol, [0]),
                   pinned={0: [5]})
    s = m.schedule(0, [{1: .5, 2: .3, 5: .2}], [[1, 2, 5]], c_load=3.0, c_host=1.0)
    assert [(k, e) for k, _, e, _ in s.ops] == [("compute", 5), ("host", 1), ("host", 2)]
    assert s.counts.hits == 1 and s.counts.host == 2 and s.counts.loads == 0 and m.resident[0] == {5}
    s = m.schedule(0, [{1: .5, 2: .3, 5: .2}], [[1, 2, 5]], c_load=1.0, c_host=1.0)   # as cheap: load the best one
    assert [(k, e) for k, _, e, _ in s.ops] == [("load", 1), ("compute", 5), ("host", 2), ("compute", 1)]


def test_next_use():
    f = NextUse({0: [[1, 2], [3], [1], [2, 4]]})
    assert f.next_use(0, 1, 0) == 1 and f.next_use(0, 1, 1) == 3 and f.next_use(0, 1, 3) == float("inf")
    assert f.next_use(0, 7, 0) == float("inf")
    assert f.first_requested({0: 3}) == {0: [1, 2, 3]} and f.first_requested({0: 9}) == {0: [1, 2, 3, 4]}


def _brute_force_loads(requests: list[frozenset], slots: int, start: frozenset, bypass: bool) -> int:
    """The fewest loads over every choice of what a cache of `slots` experts holds after each call, each requested
    expert computed from a slot one at a time in any order within its call and each miss loaded once. Without
    bypass that is every slot cache: the last miss loaded stays, and a miss that is not kept needs a slot of its own
    (at most slots - 1 old experts kept); with bypass any C' within the old cache and the request will do."""
    @lru_cache(maxsize=None)
    def best(t: int, cache: frozenset) -> int:
        if t == len(requests):
            return 0
        need = requests[t]
        miss = need - cache
        pool = sorted(cache | need)
        options = []
        for n in range(min(slots, len(pool)) + 1):
            for keep in map(frozenset, itertools.combinations(pool, n)):
                if not bypass and miss and not keep & miss:
                    continue
                if not bypass and miss - keep and len(keep & cache) > slots - 1:
                    continue
                options.append(best(t + 1, keep))
        return len(miss) + min(options)
    return best(0, start)


@pytest.mark.parametrize("seed", range(24))
def test_belady_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    experts, k, slots = 6, rng.choice([2, 3]), rng.choice([1, 2, 3, 4])   # fewer slots than k too
    weights = [rng.random() ** 3 + 0.01 for _ in range(experts)]        # skewed, as routing is
    calls = [sorted(set(rng.choices(range(experts), weights, k=k))) for _ in range(14)]
    calls = [c + [e for e in range(experts) if e not in c][: k - len(c)] for c in calls]     # k distinct each
    future = NextUse({0: calls})
    hits, loads, _ = _replay(_model("oracle", slots, experts, k, future=future), calls)
    sets = [frozenset(c) for c in calls]
    assert loads == _brute_force_loads(sets, slots, frozenset(), bypass=True) and hits + loads == k * len(calls)
    assert loads <= _brute_force_loads(sets, slots, frozenset(), bypass=False)      # the bound of every slot cache
    for name in ("lru", "lfu", "lfru"):
        assert _replay(_model(name, slots, experts, k), calls)[1] >= loads
    freq = [sum(e in c for c in calls) for e in range(experts)]
    pins = static_pins({0: freq}, {0: slots})                          # static starts with its pins, uncounted
    assert _replay(_model("static", slots, experts, k, pinned=pins), calls)[1] >= loads - len(pins[0])
    # from the best start (the first requested experts, uncounted) no start of the same size does better
    first = future.first_requested({0: slots})
    _, warm, _ = _replay(_model("oracle", slots, experts, k, future=future, initial=first), calls)
    assert warm == min(_brute_force_loads(sets, slots, frozenset(s), bypass=True)
                       for s in itertools.combinations(range(experts), slots))
