"""The substitution map: per layer and expert, ranked understudies from the profile and the experts never to
substitute.

  substitutes[i] = the `top_n` experts j != i of least err(i, j) (err = ||f_i - f_j|| / ||f_i||), with cos(i, j)
  protected      = the ceil(protect_frac * E) experts of highest importance I_e (always exact)
  drop_ok        = the unprotected experts, whose low-score misses may be left out; the compiler keeps or clears it
                   by whether its search chose drops (their measured loss cost against that of loading)
"""
from __future__ import annotations

import math

import numpy as np

from artifacts.profile import Profile


def build_substitution_map(profile: Profile, top_n: int = 8, protect_frac: float = 0.1) -> dict[int, dict]:
    out = {}
    e = profile.num_experts
    n_protect = math.ceil(protect_frac * e)
    for l in profile.moe_layers:
        err, sim, imp = profile.substitution_error[l], profile.similarity[l], profile.importance[l]
        subs = {}
        for i in range(e):
            order = [j for j in np.argsort(err[i], kind="stable") if j != i][:top_n]
            subs[i] = [(int(j), round(float(sim[i, j]), 6), round(float(err[i, j]), 6)) for j in order]
        protected = [int(x) for x in np.argsort(-imp, kind="stable")[:n_protect]]
        out[l] = {"substitutes": subs, "protected": sorted(protected),
                  "drop_ok": [i for i in range(e) if i not in protected],
                  "clusters": [int(c) for c in profile.clusters[l]]}
    return out
