"""Merging profiles of shards of a calibration set: every statistic is a sum or a count, so A + B is the profile of
A's tokens plus B's; traces and per-window measurements are concatenated and clusters recomputed from the merged
similarity. Two quantization
fields are not data sums: the weight error (a property of the weights, the same in every shard: the first's is
kept) and the importance classes (recomputed from the merged importance; each shard measured its sums with its own
classes, which differ at most for experts of near-equal importance at a class boundary). `combine` is also how a run
sharded under torchrun reduces its ranks' observation shards (profiler.distributed)."""
from __future__ import annotations

import copy

import numpy as np

from artifacts.errors import UserError
from artifacts.profile import FORMAT_VERSION, LAYER_STATS, QUANT_LAYER_STATS, Profile
from profiler.clustering import finalize_clusters
from profiler.quant_sensitivity import finalize_classes


def merge_profiles(profiles: list[Profile]) -> Profile:
    """The profile of shards A + B + ... of a calibration set (module docstring); refuses shards of different models
    or settings, or the same tokens twice."""
    if len(profiles) < 2:
        raise UserError("merge needs at least two profiles")
    first = profiles[0]
    seen: dict[str, int] = {}
    for n, p in enumerate(profiles):
        for c in p.header["calibration"]:
            key = c.get("tokens_sha256") if isinstance(c, dict) else None
            if key is None:
                continue
            if key in seen:
                raise UserError(f"profiles {seen[key] + 1} and {n + 1} were made from the same calibration tokens; "
                                "merging them would count that data twice: merge profiles of different shards")
            seen[key] = n
    for p in profiles[1:]:
        if p.fingerprint != first.fingerprint:
            raise UserError(f"cannot merge profiles of different models (fingerprints {first.fingerprint} and "
                            f"{p.fingerprint}); profile shards of one model")
        if p.header["trace"]["width"] != first.header["trace"]["width"]:
            raise UserError("cannot merge profiles made with different --trace-extra (trace width); "
                            "re-run the shards with the same settings")
    return combine(profiles)


def add_stats(shards: list[dict[str, np.ndarray]], keys) -> dict[str, np.ndarray]:
    """The shards' statistics `keys` added (float64 sums and int64 counts, in shard order), except the quantization
    weight error, a property of the weights and not of the data (the first shard's), and the per-window measurements
    (concatenated: every shard's windows, in shard order)."""
    def one(k: str) -> np.ndarray:
        if k.endswith(".quant_weight_error"):
            return shards[0][k]
        if k.endswith("_window"):
            return np.concatenate([s[k] for s in shards])
        return np.sum([s[k] for s in shards], axis=0).astype(shards[0][k].dtype)

    return {k: one(k) for k in keys}


def combine(profiles: list[Profile]) -> Profile:
    """The rules of the module docstring, on shards known to belong together (one or more)."""
    first = profiles[0]
    header = copy.deepcopy(first.header)
    header["format_version"] = FORMAT_VERSION
    header.pop("ratio_bins", None)
    # statistics every shard has (sensitivity only if every shard measured it; a version-1 shard's retired
    # statistics are left out); the merged profile is written in the current format version
    header["quant_sensitivity"] = _merge_quant_header(profiles)
    keys = [k for k in first.stats if all(k in p.stats for p in profiles) and _current(k)
            and (header["quant_sensitivity"] or not _quant(k))]
    stats = add_stats([p.stats for p in profiles], keys)
    if header["quant_sensitivity"]:
        finalize_classes(stats, first.moe_layers)
    if any(p.sensitivity is None for p in profiles):
        header["sensitivity"] = None
    else:
        header["sensitivity"]["tokens"] = int(sum(p.header["sensitivity"]["tokens"] for p in profiles))
    finalize_clusters(stats, first.moe_layers, float(header["clustering"]["threshold"]))
    offset, samples = 0, []
    for p in profiles:
        samples.append(p.trace["sample"] + offset)
        offset += int(p.trace["sample"].max()) + 1 if len(p.trace["sample"]) else 0
    trace = {k: np.concatenate([p.trace[k] for p in profiles]) for k in ("ids", "scores", "coef", "pred_ids", "pred_scores", "token")}
    trace["sample"] = np.concatenate(samples)
    header["calibration"] = [c for p in profiles for c in p.header["calibration"]]
    header["probe"] = {"tokens": int(sum(p.header["probe"]["tokens"] for p in profiles))}
    header["trace"]["tokens"] = int(len(trace["token"]))
    header["run"] = {"merged_from": [p.header["run"] for p in profiles]}
    return Profile(header=header, stats=stats, trace=trace)


def _merge_quant_header(profiles: list[Profile]) -> dict | None:
    """The merged `quant_sensitivity` section: None unless every shard measured it, with the same schemes and
    classes."""
    heads = [p.header.get("quant_sensitivity") for p in profiles]
    if not all(heads):
        return None
    first = heads[0]
    for n, h in enumerate(heads[1:], start=2):
        if h["schemes"] != first["schemes"] or h["classes"] != first["classes"]:
            raise UserError(f"profiles 1 and {n} measured quantization with different schemes or classes; "
                            "re-run the shards with the same Understudy version")
    return {**copy.deepcopy(first), "tokens": sum(int(h["tokens"]) for h in heads),
            "seconds": round(sum(float(h.get("seconds", 0.0)) for h in heads), 2)}


def _quant(key: str) -> bool:
    return key.startswith("quant.") or key.partition(".")[2] in QUANT_LAYER_STATS


def _current(key: str) -> bool:
    """A statistic this format version keeps (per-layer "L{l}.name" of LAYER_STATS, or a sensitivity or quantization
    statistic)."""
    return key.startswith("sensitivity.") or key.partition(".")[2] in LAYER_STATS or _quant(key)
