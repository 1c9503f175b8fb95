"""A layer's cache slots are rows of one allocation, and a call with several tokens computes its cached experts in
one grouped matmul over them: the same bits as the per-expert loop, the same decisions, the same bytes."""
import pytest
import torch

from runtime import Runtime
from runtime.expert_cache import ExpertCache
from runtime.formats import TensorSpec

SPECS = {"gate_up": TensorSpec((64, 32), torch.bfloat16), "down": TensorSpec((32, 32), torch.bfloat16)}


@pytest.mark.parametrize("flat", [None, (("gate_up", 4096), ("down", 2048))])
def test_slots_are_rows_of_one_stack(flat):
    """What a load writes into a slot is row `where[e]` of the layer's stacks; the cache allocates its capacity and
    not a byte more (storage counted, not views)."""
    cache = ExpertCache(SPECS, {0: 3, 2: 2}, torch.device("cpu"), flat=flat)
    assert set(cache.stacks) == {0, 2} and cache.stacks[0]["gate_up"].shape == (3, 64, 32)
    for e, v in [(5, 1.0), (9, 2.0), (1, 3.0)]:
        w = cache.assign(0, e)
        w["gate_up"].fill_(v)
        w["down"].fill_(-v)
    cache.evict(0, 9)
    w = cache.assign(0, 7)
    w["gate_up"].fill_(4.0)
    w["down"].fill_(-4.0)
    for e, v in [(5, 1.0), (1, 3.0), (7, 4.0)]:
        s = cache.where[0][e]
        assert torch.equal(cache.stacks[0]["gate_up"][s], torch.full((64, 32), v, dtype=torch.bfloat16))
        assert torch.equal(cache.stacks[0]["down"][s], torch.full((32, 32), -v, dtype=torch.bfloat16))
    assert cache.allocated_bytes() == cache.capacity_bytes == 5 * (4096 + 2048)
    for t in (w for slots in cache._buf.values() for slot in slots for w in slot.values()):
        assert t.data_ptr() % 64 == 0                  # every slot tensor 64-byte aligned, as its own would be


def test_replace_is_evict_then_assign():
    """`replace(victim, e)` (a direct call's load over a victim) leaves the cache as evict then assign would: e in the
    victim's slot, the victim gone, the bytes held unchanged; the slot's tensors are the victim's, and evicting e
    frees that slot again."""
    cache = ExpertCache(SPECS, {0: 3}, torch.device("cpu"))
    for e in (4, 6, 8):
        cache.assign(0, e)
    slot, tensors, used = cache.where[0][6], cache.held[0][6], cache.used_bytes
    w = cache.replace(0, 6, 11)
    assert cache.where[0] == {4: cache.where[0][4], 8: cache.where[0][8], 11: slot}
    assert w is tensors and cache.weights(0, 11) is tensors and 6 not in cache.held[0]
    assert cache.used_bytes == used == cache.peak_bytes
    cache.evict(0, 11)
    assert cache.assign(0, 2) is tensors and cache.where[0][2] == slot


def test_unaligned_slots_are_not_stacked():
    """A slot whose rows would not start at 64-byte multiples keeps its own allocation (and the loop computes it):
    a slot's bytes, or with a stack per key one key's bytes, not a multiple of 64."""
    specs = {"gate_up": TensorSpec((6, 5), torch.bfloat16), "down": TensorSpec((5, 3), torch.bfloat16)}
    cache = ExpertCache(specs, {0: 3}, torch.device("cpu"))
    assert cache.stacks == {} and cache.allocated_bytes() == cache.capacity_bytes == 3 * 90
    specs = {"gate_up": TensorSpec((4, 12), torch.bfloat16), "down": TensorSpec((4, 4), torch.bfloat16)}   # 96 + 32
    cache = ExpertCache(specs, {0: 3}, torch.device("cpu"))
    assert cache.stacks == {} and cache.allocated_bytes() == cache.capacity_bytes == 3 * 128
    for t in (w for slot in cache._buf[(0, 0)] for w in slot.values()):
        assert t.data_ptr() % 64 == 0


def _run(model, policy, cache, grouped, ids, new_tokens, link=None):
    """Logits of a forward of ids, then a greedy decode from them, with the grouped call on or off; the number of
    grouped calls and the cache statistics."""
    with Runtime.load(model, policy=policy, cache=cache, link=link) as rt:
        ex, calls = rt.executor, []
        if grouped:
            fn = ex.grouped_fn
            assert fn is not None

            def counted(*a):
                calls.append(a[0].shape[0])
                return fn(*a)
            ex.grouped_fn = counted
        else:
            ex.grouped_fn = None
        logits = rt.forward(ids)
        tokens = rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=new_tokens)
        d = rt.stats.to_dict()
    return logits, tokens, calls, {k: d[k] for k in ("loads", "hits", "pairs", "bytes_loaded", "substitutions")
                                   if k in d}


@pytest.mark.parametrize("policy,cache,link", [
    ("lru", "50%", None),          # decode calls direct (every needed expert fits), prefill through the op list
    ("lfru", 4, None),             # few slots: calls stream, loads evicting experts computed earlier in the call
    ("lru", 8, "1GB/s,1us"),       # copies on the loader thread: the cached experts' group first, then the loaded
    ("smoe", "50%", None),         # understudies and drops: the general path's groups
])
def test_grouped_calls_equal_the_per_expert_loop(fixture_model, policy, cache, link):
    ids = torch.randint(1, 4096, (3, 12), generator=torch.Generator().manual_seed(3))
    ref = _run(fixture_model, policy, cache, False, ids, 10, link)
    ours = _run(fixture_model, policy, cache, True, ids, 10, link)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert ours[3] == ref[3] and ref[3]["loads"] > 0
    assert len(ours[2]) > 0 and ref[2] == []
    if policy in ("lru", "lfru"):   # lossless: resident's logits too
        with Runtime.load(fixture_model, policy="resident") as rt:
            assert torch.equal(rt.forward(ids), ours[0])


@pytest.mark.parametrize("policy", ["lru", "smoe"])
def test_grouped_cached_experts_compute_while_loads_land(fixture_model, policy):
    """With copies on the loader thread, a call's landed experts are computed (one grouped call) before its loading
    ones have landed (timestamps, not speed): on the lossless path and on the general one. One-token prompts and 12
    slots of 16: every call of 3 tokens (12 pairs) is direct, its loads issued at its start and waited in it, so a
    compute that ends while a load of its layer is in flight is one of the landed experts' group."""
    ids = torch.randint(1, 4096, (3, 1), generator=torch.Generator().manual_seed(4))
    with Runtime.load(fixture_model, policy=policy, cache=12, link="20MB/s,1ms", record_events=True,
                      prefetch=False) as rt:
        calls = []
        fn = rt.executor.grouped_fn

        def counted(*a):
            calls.append(a[0].shape[0])
            return fn(*a)
        rt.executor.grouped_fn = counted
        rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=6)
        ev = rt.executor.events
    loads = [(l, t0, t1) for kind, t0, t1, l, e in (x for x in ev if x[0] == "load")]
    ends = {(layer, t) for kind, t, layer, e in (x for x in ev if x[0] == "compute_end")}
    assert calls and any(l == layer and t0 < t < t1 for layer, t in ends for l, t0, t1 in loads)
