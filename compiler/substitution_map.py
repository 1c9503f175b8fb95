"""The substitution map: per layer, the functional clusters of experts, each expert's near-twin candidates, why
other pairs were not taken, and the experts never to substitute.

  clusters         the profile's functional groups (agglomerative on the mean output cosine, as HC-SMoE groups
                   experts): per cluster its members and the mean and max measured error err(i, j) between them
  substitutes[i]   the experts j != i *in i's cluster* with err(i, j) = ||f_i - f_j|| / ||f_i|| <= TWIN_MAX_ERROR,
                   best first (at most `top_n`), with cos(i, j): the only pairs that may serve as near-twins; the plan's
                   tau (<= TWIN_MAX_ERROR) cuts them further at run time
  not_taken[i]     the nearest experts by error that are not candidates, with the reason ("other cluster", or
                   "error over 0.9" within the cluster)
  protected        the ceil(protect_frac * E) experts of highest importance I_e (always exact)
  drop_ok          the unprotected experts, whose low-score misses may be dropped where the plan chose drops
Near-twins stand in with the replaced expert's weight; experts in singleton clusters have none (on a model whose
experts all differ, only band understudies, the router's own next choices, remain).
"""
from __future__ import annotations

import math

import numpy as np

from artifacts.profile import Profile

TWIN_MAX_ERROR = 0.9       # the largest profiled relative error a near-twin may have (the compiler's largest tau)


def build_substitution_map(profile: Profile, top_n: int = 8, protect_frac: float = 0.1) -> dict[int, dict]:
    out = {}
    e = profile.num_experts
    n_protect = math.ceil(protect_frac * e)
    for l in profile.moe_layers:
        err, sim, imp = profile.substitution_error[l], profile.similarity[l], profile.importance[l]
        labels = [int(c) for c in profile.clusters[l]]
        members: dict[int, list[int]] = {}
        for i, c in enumerate(labels):
            members.setdefault(c, []).append(i)
        clusters = []
        for c, ids in sorted(members.items()):
            within = [float(err[i, j]) for i in ids for j in ids if i != j]
            clusters.append({"id": c, "members": ids,
                             "mean_error": round(float(np.mean(within)), 6) if within else None,
                             "max_error": round(float(np.max(within)), 6) if within else None})
        subs, not_taken = {}, {}
        for i in range(e):
            order = [int(j) for j in np.argsort(err[i], kind="stable") if j != i]
            twins = [j for j in order if labels[j] == labels[i] and err[i, j] <= TWIN_MAX_ERROR][:top_n]
            subs[i] = [(j, round(float(sim[i, j]), 6), round(float(err[i, j]), 6)) for j in twins]
            not_taken[i] = [(j, round(float(err[i, j]), 6),
                             "other cluster" if labels[j] != labels[i] else f"error over {TWIN_MAX_ERROR:g}")
                            for j in order if j not in twins][:3]
        protected = [int(x) for x in np.argsort(-imp, kind="stable")[:n_protect]]
        out[l] = {"substitutes": subs, "protected": sorted(protected),
                  "drop_ok": [i for i in range(e) if i not in protected],
                  "clusters": labels, "cluster_table": clusters, "not_taken": not_taken}
    return out
