"""moe-profile on tiny models of every family and on the shared fixture."""
import numpy as np
import pytest
import torch
import transformers

from artifacts import Profile
from helpers import DATA, sample_texts, write_jsonl
from profiler.merge import merge_profiles
from profiler.profile_model import ProfileConfig, profile
from runtime.families import resolve_arch
from tiny_models import FAMILIES, build_tiny

SEQ = 32


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    # each text is SEQ-1 bytes, + EOS = exactly one window
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", sample_texts(8, SEQ - 1))


def _cfg(**kw):
    return ProfileConfig(**{"samples": 100, "seq_len": SEQ, "batch_size": 3, "probe_tokens": 10_000, **kw})


def _hf_routing(path, tokens, family):
    """Chosen experts per MoE layer from HF's own routers on the same tokens: {layer: [T, k] sorted ids}."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    arch = resolve_arch(hf.config)
    got = {}
    hooks = [getattr(hf.model.layers[l].mlp, arch.router_attr).register_forward_hook(
        lambda m, i, o, l=l: got.setdefault(l, []).append(o[2])) for l in arch.moe_layers]
    with torch.no_grad():
        hf(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    return {l: torch.sort(torch.cat(v), dim=1).values.numpy() for l, v in got.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_equals_hf_routers(family, tiny_model, calib):
    path = tiny_model(family)
    p = profile(path, str(calib), _cfg(), progress=False)
    k = p.top_k
    tokens = p.trace["token"].reshape(-1, SEQ).astype(np.int64)
    ref = _hf_routing(path, tokens, family)
    for m, l in enumerate(p.moe_layers):
        ours = np.sort(p.trace["ids"][:, m, :k], axis=1)
        assert np.array_equal(ours, ref[l]), (family, l)
        # the trace lists the chosen experts by descending score, then the next best
        s = p.trace["scores"][:, m]
        assert np.all(np.diff(s[:, :k], axis=1) <= 0) and np.all(s[:, k - 1] >= s[:, k])
    assert p.header["trace"]["width"] == 2 * k
    for l in p.moe_layers:
        assert p.frequency[l].sum() == pytest.approx(k)           # every token picks k experts
        assert p.importance[l].shape == (p.num_experts,)
        assert np.allclose(np.diag(p.similarity[l]), 1.0)
        assert np.allclose(np.diag(p.substitution_error[l]), 0.0)


def test_planted_copy_and_zeroed_expert(tmp_path, calib):
    def tweak(model):
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[5].copy_(experts.gate_up_proj[3])
        experts.down_proj[5].copy_(experts.down_proj[3])
        experts.gate_up_proj[6].zero_()
        experts.down_proj[6].zero_()

    path = build_tiny("qwen3_moe", tmp_path / "planted", tweak=tweak)
    p = profile(path, str(calib), _cfg(), progress=False)
    sim, err, clusters, imp = p.similarity[0], p.substitution_error[0], p.clusters[0], p.importance[0]
    assert sim[3, 5] == pytest.approx(1.0, abs=1e-9) and err[3, 5] == pytest.approx(0.0, abs=1e-6)
    assert clusters[3] == clusters[5]
    others = [e for e in range(p.num_experts) if e not in (3, 5)]
    assert all(clusters[e] != clusters[3] for e in others if sim[3, e] < 0.5)
    assert p.frequency[0][6] > 0                       # routed to, yet contributes nothing
    assert imp[6] == 0.0 and np.argsort(imp, kind="stable")[0] == 6 or imp[6] <= imp.min()
    assert imp[6] < min(imp[e] for e in range(p.num_experts) if e != 6 and p.frequency[0][e] > 0)

    # the clusters decide the near-twins: 5 is 3's (and 3 is 5's); nobody outside a cluster ever is
    from compiler.substitution_map import TWIN_MAX_ERROR, build_substitution_map

    m = build_substitution_map(p)
    assert m[0]["substitutes"][3][0][0] == 5 and m[0]["substitutes"][5][0][0] == 3
    for l, layer in m.items():
        labels = layer["clusters"]
        for i, ranked in layer["substitutes"].items():
            assert all(labels[j] == labels[i] and e <= TWIN_MAX_ERROR for j, _, e in ranked)
            for j, e, why in layer["not_taken"][i]:
                assert why == ("other cluster" if labels[j] != labels[i] else f"error over {TWIN_MAX_ERROR:g}")
        members = sorted(x for c in layer["cluster_table"] for x in c["members"])
        assert members == list(range(p.num_experts))


def test_same_inputs_same_profile(tiny_model, calib):
    cfg = _cfg(probe_tokens=50, samples=5, seed=3)
    a = profile(tiny_model("mixtral"), str(calib), cfg, progress=False)
    b = profile(tiny_model("mixtral"), str(calib), cfg, progress=False)
    assert a.stats.keys() == b.stats.keys()
    assert all(np.array_equal(a.stats[k], b.stats[k]) for k in a.stats)
    assert all(np.array_equal(a.trace[k], b.trace[k]) for k in a.trace)
    assert a.header["model"]["fingerprint"] == b.header["model"]["fingerprint"]
    assert a.header["calibration"] == b.header["calibration"]


def test_merge_of_shards_equals_one_run(tiny_model, tmp_path):
    texts = sample_texts(10, SEQ - 1, seed=7)
    a = write_jsonl(tmp_path / "a.jsonl", texts[:4])
    b = write_jsonl(tmp_path / "b.jsonl", texts[4:])
    both = write_jsonl(tmp_path / "both.jsonl", texts)
    path = tiny_model("deepseek_v3")
    # no quantization passes: each shard measures them with its own importance classes, which these shards do not
    # share with the whole (tests/profiler/test_quant_sensitivity.py merges shards whose classes agree)
    pa, pb, pab = (profile(path, str(d), _cfg(quant_tokens=0), progress=False) for d in (a, b, both))
    pa.save(tmp_path / "pa")
    merged = merge_profiles([Profile.load(tmp_path / "pa"), pb])
    for k in pab.stats:
        # forward passes batch the windows differently, so float32 sums differ in the last bits
        # (the sensitivity sums are differences of whole-run NLL sums: the last bits show at 1e-3 nats)
        atol = 1e-3 if k.startswith("sensitivity.") else 1e-6
        np.testing.assert_allclose(merged.stats[k], pab.stats[k], rtol=1e-5, atol=atol, err_msg=k)
    for k in ("ids", "token", "sample"):
        assert np.array_equal(merged.trace[k], pab.trace[k])
    assert len(merged.header["calibration"]) == 2


def test_fixture_profile(fixture_model, tmp_path):
    p = profile(fixture_model, str(DATA / "calib.jsonl"), ProfileConfig(samples=4, seq_len=64, probe_tokens=128),
                progress=False)
    assert p.moe_layers == [0, 1, 2, 3] and p.num_experts == 16 and p.top_k == 4
    tokens = p.trace["token"].reshape(-1, 64).astype(np.int64)
    ref = _hf_routing(fixture_model, tokens, "qwen2_moe")
    for m, l in enumerate(p.moe_layers):
        assert np.array_equal(np.sort(p.trace["ids"][:, m, :4], axis=1), ref[l])
    # trained-from-scratch experts are unlike each other
    for l in p.moe_layers:
        off = p.similarity[l][~np.eye(16, dtype=bool)]
        assert off.mean() < 0.3
    assert p.header["model"]["expert_bytes"] == 3 * 256 * 256 * 2
    p.save(tmp_path / "prof")
    q = Profile.load(tmp_path / "prof")
    assert all(np.array_equal(q.importance[l], p.importance[l]) for l in p.moe_layers)
