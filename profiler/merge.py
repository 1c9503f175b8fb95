"""Merging profiles of shards of a calibration set: every statistic is a sum or a count, so A + B is the profile of
A's tokens plus B's; traces are concatenated and clusters recomputed from the merged similarity."""
from __future__ import annotations

import copy

import numpy as np

from artifacts.errors import UserError
from artifacts.profile import FORMAT_VERSION, LAYER_STATS, Profile
from profiler.profile_model import finalize_clusters


def merge_profiles(profiles: list[Profile]) -> Profile:
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
    header = copy.deepcopy(first.header)
    header["format_version"] = FORMAT_VERSION
    header.pop("ratio_bins", None)
    # statistics every shard has (sensitivity only if every shard measured it; a version-1 shard's retired
    # statistics are left out); the merged profile is written in the current format version
    keys = [k for k in first.stats if all(k in p.stats for p in profiles) and _current(k)]
    stats = {k: np.sum([p.stats[k] for p in profiles], axis=0).astype(first.stats[k].dtype) for k in keys}
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


def _current(key: str) -> bool:
    """A statistic this format version keeps (per-layer "L{l}.name" of LAYER_STATS, or a sensitivity sum)."""
    return key.startswith("sensitivity.") or key.partition(".")[2] in LAYER_STATS
