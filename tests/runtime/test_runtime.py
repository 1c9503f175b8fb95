"""The offloading runtime: exactness of every policy in lossless mode, the cache bound, overlap, plans."""
import pytest
import torch
import transformers

from artifacts import Plan, UserError
from artifacts.header import new_header
from artifacts.plan import FORMAT, FORMAT_VERSION
from runtime import Runtime
from runtime.fingerprint import model_fingerprint
from runtime.model_loader import load_model
from tiny_models import FAMILIES, build_tiny

IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))


def _hf(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                             experts_implementation="eager").eval()


def _plan(path, slots, substitutes=None, alpha=0.3, protected=None, drop_ok=None, initial=None) -> Plan:
    lm = load_model(path, dtype=torch.float32)
    layers = lm.arch.moe_layers
    eb = lm.arch.experts.numel() * lm.ckpt.float_dtype().itemsize
    header = new_header(FORMAT, FORMAT_VERSION, model={"fingerprint": model_fingerprint(lm.arch, lm.config, lm.ckpt),
                                                       "moe_layers": list(layers), "num_experts": lm.arch.num_experts,
                                                       "top_k": lm.arch.top_k, "expert_bytes": eb},
                        budget={"kind": "slots", "cache_bytes": slots * len(layers) * eb},
                        choices={"alpha": alpha, "tau": 0.5, "window": 8, "pool_depth": None, "drop_misses": True,
                                 "prefetch": True, "prefetch_max": None, "host_compute": False})
    return Plan(header=header, slots={l: slots for l in layers}, expert_bytes=eb,
                substitutes={l: (substitutes or {}) for l in layers}, protected={l: protected or [] for l in layers},
                drop_ok={l: drop_ok or [] for l in layers}, initial={l: (initial or []) for l in layers})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["resident", "lru", "smoe", "plan"])
def test_lossless_policies_match_hf(family, policy, tiny_model):
    path = tiny_model(family)
    kw = {"plan": _plan(path, 2)} if policy == "plan" else ({"cache": 2} if policy != "resident" else {})
    with Runtime.load(path, policy=policy, lossless=True, dtype=torch.float32, **kw) as rt:
        logits = rt.forward(IDS)
        hf = _hf(path)
        with torch.no_grad():
            ref = hf(IDS).logits
        assert torch.equal(logits, ref)
        ids = IDS[:1]
        ours = rt.generate_ids(ids, max_new_tokens=10)
        theirs = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=rt.eos_id, pad_token_id=0)
        n = ours.shape[1]
        assert ours[0].tolist() == theirs[0, ids.shape[1]:ids.shape[1] + n].tolist()
        if policy != "resident":
            assert rt.stats.to_dict()["loads"] > 0 and rt.stats.to_dict()["substitution_rate"] == 0.0


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_batched_left_padded_greedy_matches_hf(fixture_model, dtype):
    """The default dtype on CPU is the checkpoint's (bf16 here); float32 on request. Both are exact against HF in
    the same dtype, with the cache holding bf16 experts either way."""
    with Runtime.load(fixture_model, policy="lru", cache="25%", lossless=True, dtype=dtype) as rt:
        assert rt.lm.dtype == (dtype or torch.bfloat16) and rt.cache.expert_bytes == rt.store.expert_bytes
        assert rt.store.dtype == torch.bfloat16
        prompts = ["The function returns", "And the LORD said unto"]
        ids, mask = rt.encode(prompts)
        tokens = rt.generate_ids(ids, mask, max_new_tokens=12)
        hf = _hf(fixture_model, rt.lm.dtype)
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=rt.pad_id)
        for row in range(2):
            ours = tokens[row].tolist()
            theirs = ref[row, ids.shape[1]:].tolist()[: len(ours)]
            assert ours == theirs


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_fixture_lossless_logits(fixture_model, dtype):
    ids = torch.randint(1, 4096, (1, 40), generator=torch.Generator().manual_seed(0))
    with Runtime.load(fixture_model, policy="smoe", cache="25%", lossless=True, dtype=dtype) as rt:
        diff = (rt.forward(ids) - _hf(fixture_model, rt.lm.dtype)(ids).logits).abs().max().item()
    assert diff == 0.0


def test_cache_never_exceeds_budget_over_long_generation(fixture_model):
    with Runtime.load(fixture_model, policy="smoe", cache="25%", link="2GB/s") as rt:
        routed = rt.store.expert_bytes * 16 * 4
        budget = 0.25 * routed
        seen = []

        def check(_tokens):
            seen.append(rt.cache.used_bytes)
            assert rt.cache.used_bytes <= rt.cache.capacity_bytes <= budget

        rt.generate(["The function returns", "In the beginning"], max_new_tokens=64, on_step=check)
        alloc = rt.cache.allocated_bytes()                   # storage behind the slots, each allocation once
        assert alloc == rt.cache.capacity_bytes and len(seen) >= 32
        assert rt.stats.peak_cache_bytes <= budget
        d = rt.stats.to_dict()
        assert d["loads"] > 0 and d["bytes_loaded"] == d["loads"] * rt.store.expert_bytes


def test_cached_experts_computed_while_loads_in_flight(fixture_model):
    """With a slow link, hits are computed before the missing experts arrive (timestamps, not speed)."""
    with Runtime.load(fixture_model, policy="lru", cache=8, link="20MB/s,1ms", record_events=True) as rt:
        rt.generate(["The function returns"], max_new_tokens=6)
        ev = rt.executor.events
    loads = {(l, e): (t0, t1) for kind, t0, t1, l, e in (x for x in ev if x[0] == "load")}
    overlapped = 0
    for kind, t, layer, e in (x for x in ev if x[0] == "compute_end"):
        # a cached expert finished computing while a load of the same layer call was still in flight
        if any(l == layer and t0 < t < t1 for (l, _), (t0, t1) in loads.items()):
            overlapped += 1
    assert overlapped > 0
    assert rt.stats.to_dict()["stall_s"] > 0


@pytest.mark.parametrize("score5,err,reason", [(0.15, 1.5, "band"), (0.15, 0.0, "similarity"), (0.0, 0.0, "similarity")])
def test_plan_understudy_is_exact_for_a_planted_copy(tmp_path, score5, err, reason):
    """Expert 5 is an exact copy of 3. When 3 misses at a low score and 5 is cached, 5 stands in: as the profile's
    near-twin when the plan lists it (error 0, inside or outside the band), with 3's weight, so the output is
    unchanged; else as the band's next router choice, with its own gate (the output of routing to 0 and 5)."""
    from runtime.resident import ResidentExecutor
    from runtime.router import Routing

    def tweak(model):
        ex = model.model.layers[0].mlp.experts
        ex.gate_up_proj[5].copy_(ex.gate_up_proj[3])
        ex.down_proj[5].copy_(ex.down_proj[3])

    path = build_tiny("qwen3_moe", tmp_path / "copy", tweak=tweak)
    plan = _plan(path, slots=3, substitutes={3: [(5, 1.0, err)]}, alpha=1.0, initial=[5])
    with Runtime.load(path, plan=plan, policy="plan", dtype=torch.float32) as rt:
        x = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
        score = torch.tensor([[0.4, 0.15, 0.05, 0.2, 0.05, score5, 0.0, 0.0]])   # S(k+1) = 0.15
        idx = torch.tensor([[0, 3]])
        routing = Routing(idx=idx, weights=score.gather(1, idx), score=score, coef=torch.ones(1), gate=score)
        assert set(rt.cache.where[0]) == {5}
        out = rt.executor(0, x, routing)
        d = rt.stats.to_dict()
        assert d["understudies"][reason] == 1 and d["misses"] == 1 and d["loads"] == 1   # 0 loaded, 3 replaced
        if reason == "band":
            idx5 = torch.tensor([[0, 5]])
            routing = Routing(idx=idx5, weights=score.gather(1, idx5), score=score, coef=torch.ones(1), gate=score)
        ref = ResidentExecutor(rt.store, rt.lm.device, rt.lm.dtype)(0, x, routing)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_plan_for_another_model_is_refused(tiny_model):
    plan = _plan(tiny_model("olmoe"), 2)
    with pytest.raises(UserError, match="another model"):
        Runtime.load(tiny_model("qwen3_moe"), plan=plan, policy="plan")


def test_cache_argument_errors(tiny_model):
    with pytest.raises(UserError, match="needs a cache size"):
        Runtime.load(tiny_model("olmoe"), policy="lru")
    with pytest.raises(UserError, match="fewer than one per MoE layer"):
        Runtime.load(tiny_model("olmoe"), policy="lru", cache="1%")
    with pytest.raises(UserError, match="unknown policy"):
        Runtime.load(tiny_model("olmoe"), policy="fifo", cache=2)
    with pytest.raises(UserError, match="needs a plan"):
        Runtime.load(tiny_model("olmoe"), policy="plan")
    with pytest.raises(UserError, match="policy smoe needs a cache size"):   # the default: plan with a plan, else smoe
        Runtime.load(tiny_model("olmoe"))
