"""The profile artifact: versioned, atomically written, validated on load."""
import json

import numpy as np
import pytest

from artifacts import Profile, UserError
from artifacts.atomic import atomic_dir
from artifacts.profile import FORMAT, FORMAT_VERSION


def _tiny_profile(e=4, k=2, version=FORMAT_VERSION):
    layers = [0, 2]
    stats = {}
    for l in layers:
        stats.update({f"L{l}.tokens": np.array([10]), f"L{l}.act_count": np.full(e, 5),
                      f"L{l}.importance_sum": np.arange(e, dtype=float), f"L{l}.probe_count": np.array([2]),
                      f"L{l}.cos_sum": 2 * np.eye(e), f"L{l}.err_sum": np.zeros((e, e)),
                      f"L{l}.clusters": np.arange(e)})
        if version == 1:   # what version 1 also stored, and nothing read
            stats.update({f"L{l}.score_sum": np.ones(e), f"L{l}.score_sqsum": np.ones(e),
                          f"L{l}.active_score_sum": np.ones(e), f"L{l}.ratio_hist": np.zeros((e, 3), np.int64),
                          f"L{l}.coact": np.zeros((e, e), np.int64), f"L{l}.transition": np.zeros((e, e), np.int64),
                          f"L{l}.out_norm_sum": np.ones(e)})
    header = {"format": FORMAT, "format_version": version,
              "model": {"moe_layers": layers, "num_experts": e, "top_k": k, "fingerprint": "abc", "expert_bytes": 64,
                        "routed_expert_bytes": 64 * e * len(layers)},
              "trace": {"width": 4, "tokens": 3}, "clustering": {"threshold": 0.5}, "calibration": []}
    trace = {"ids": np.zeros((3, 2, 4), np.int32), "scores": np.zeros((3, 2, 4), np.float32),
             "coef": np.ones((3, 2), np.float32), "pred_ids": np.zeros((3, 2, 4), np.int32),
             "pred_scores": np.zeros((3, 2, 4), np.float32), "token": np.zeros(3, np.int32), "sample": np.zeros(3, np.int32)}
    return Profile(header=header, stats=stats, trace=trace)


def test_round_trip_and_api(tmp_path):
    p = _tiny_profile()
    p.save(tmp_path / "p")
    q = Profile.load(tmp_path / "p")
    assert q.moe_layers == [0, 2] and q.num_experts == 4 and q.top_k == 2
    assert np.allclose(q.importance[2], np.arange(4) / 5)
    assert np.allclose(q.frequency[0], 0.5) and np.allclose(q.similarity[0], np.eye(4))
    assert q.substitution_error[0].shape == (4, 4) and q.clusters[2].tolist() == [0, 1, 2, 3]


def test_version_1_profiles_still_load(tmp_path):
    _tiny_profile(version=1).save(tmp_path / "p1")
    h = json.loads((tmp_path / "p1" / "profile.json").read_text())
    assert h["format_version"] == 1
    q = Profile.load(tmp_path / "p1")
    assert np.allclose(q.importance[2], np.arange(4) / 5) and q.clusters[0].tolist() == [0, 1, 2, 3]


def test_newer_version_is_refused(tmp_path):
    _tiny_profile().save(tmp_path / "p")
    h = json.loads((tmp_path / "p" / "profile.json").read_text())
    h["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "p" / "profile.json").write_text(json.dumps(h))
    with pytest.raises(UserError, match="format version"):
        Profile.load(tmp_path / "p")


def test_corrupt_files_are_user_errors(tmp_path):
    _tiny_profile().save(tmp_path / "p")
    (tmp_path / "p" / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        Profile.load(tmp_path / "p")
    (tmp_path / "p" / "profile.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Profile.load(tmp_path / "p")
    with pytest.raises(UserError, match="does not exist"):
        Profile.load(tmp_path / "nothing")


def test_missing_tensor_is_refused(tmp_path):
    p = _tiny_profile()
    del p.stats["L2.cos_sum"]
    with pytest.raises(UserError, match="L2.cos_sum"):
        p.save(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
