"""Which experts a token runs exactly, which an understudy replaces, and which are dropped (SMoE + profile).

For one token at one layer, with scores s (its router scores) and S = S(k+1) the (k+1)-th highest score:
  top-score experts       s_e > (1 + alpha) * S      always exact (loaded if missing)
  low-score experts E_l   S < s_e <= (1 + alpha) * S  may be substituted when missing
  substitute pool E_s     inactive e with (1 - alpha) * S < s_e <= S that are cached or are a top-score expert of
                          another token in the batch (so they will be on the device anyway)
SMoE keeps cached (or batch-top) low-score experts and replaces each remaining low-score miss by the highest-scoring
member of E_s not yet used by this token; misses left when E_s runs out are loaded.
The plan adds three things, each measured by the profiler:
  `pool_depth` d: only the token's d highest-scoring inactive experts may stand in (its (k+1)-th, ...): measured on
                  held-out loss, the router's next choice is a good understudy and deeper ones cost more than a drop;
  `similar`:      for a low-score miss i, cached experts whose profiled output error err(i, j) <= tau (near-twins),
                  tried before the band pool, least error first;
  `drop_ok`:      a low-score miss with no candidate is left out instead of loaded.
`protected` experts are never substituted. With alpha = 0 the band is empty: every decision is exact (lossless).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Iterable, Mapping, Sequence


def best_first(experts: Iterable[int], score: Callable[[int], float]) -> list[int]:
    """The experts in (-score(e), e) order: best score first, ties by lower id. Two C sorts (by id, then stably by
    descending score: `reverse` keeps equal keys in their order) instead of a key tuple per expert; the lean models'
    hot path. The reference rules keep `sorted(..., key=lambda e: (-score(e), e))`."""
    out = sorted(experts)
    out.sort(key=score, reverse=True)
    return out


@dataclass(frozen=True)
class SubstitutionParams:
    alpha: float = 0.0                                   # score band half-width, relative to S(k+1)
    use_batch: bool = True                               # other tokens' top-score experts may stand in
    similar: Mapping[int, Sequence[tuple[int, float]]] | None = None  # i -> [(j, err_ij)] ranked, err <= tau
    error: Mapping[int, Mapping[int, float]] | None = None            # err(i, j) for choosing among candidates
    by_error: bool = False                               # plan: band (by score) then similar (by error); drops
    pool_depth: int | None = None                        # band understudies among the d best inactive experts only
    protected: AbstractSet[int] = frozenset()            # never substituted
    drop_ok: AbstractSet[int] = frozenset()              # low-score misses that may be left out


def substitutes(params: Mapping[int, SubstitutionParams]) -> bool:
    """Whether any layer may serve a pair otherwise than exactly (a band, batch or near-twin understudy, or a drop):
    the policy's output then departs from the model's."""
    return any(p.alpha > 0 or p.similar or p.drop_ok for p in params.values())


@dataclass
class TokenDecision:
    exact: list[int] = field(default_factory=list)                     # run with their own weights
    understudy: dict[int, tuple[int, str]] = field(default_factory=dict)  # missing i -> (j, "band"|"batch"|"similarity")
    dropped: list[int] = field(default_factory=list)


ScoreMap = Mapping[int, float]   # expert -> score; experts absent score 0 (a token's top-W view)


def as_scores(scores: Sequence[float] | ScoreMap) -> ScoreMap:
    if type(scores) is dict:             # the common case, without typing's (slow) isinstance machinery
        return scores
    return scores if isinstance(scores, Mapping) else dict(enumerate(scores))


def kth_next(scores: Sequence[float] | ScoreMap, k: int) -> float:
    """S(k+1): the (k+1)-th highest score (0 when fewer than k+1 experts have a score)."""
    values = sorted(as_scores(scores).values(), reverse=True)
    return values[k] if len(values) > k else 0.0


def top_score_set(scores: Sequence[float] | ScoreMap, chosen: Sequence[int], alpha: float) -> set[int]:
    """The chosen experts whose score exceeds (1 + alpha) * S(k+1)."""
    scores = as_scores(scores)
    s_next = kth_next(scores, len(chosen))
    return {e for e in chosen if scores.get(e, 0.0) > (1.0 + alpha) * s_next}


def decide_token(scores: Sequence[float] | ScoreMap, chosen: Sequence[int], cached: AbstractSet[int],
                 batch_top: AbstractSet[int], params: SubstitutionParams) -> TokenDecision:
    """Decision for one token: its scores ([E] or a sparse map), chosen [k] (the router's experts), cached ids,
    the top-score experts of the other tokens in the batch."""
    d = TokenDecision()
    if params.alpha <= 0.0:
        d.exact = list(chosen)
        return d
    score_map = as_scores(scores)
    k = len(chosen)
    s_next = kth_next(score_map, k)
    def score(e: int) -> float:
        return score_map.get(e, 0.0)

    hi, lo = (1.0 + params.alpha) * s_next, (1.0 - params.alpha) * s_next
    available = set(cached) | (set(batch_top) if params.use_batch else set())
    chosen_set = set(chosen)
    pool = sorted((e for e in available if e not in chosen_set and lo < score(e) <= s_next),
                  key=lambda e: (-score(e), e))                      # E_s, best score first
    if params.pool_depth is not None:
        ranked = sorted((e for e in score_map if e not in chosen_set), key=lambda e: (-score(e), e))
        allowed = set(ranked[: params.pool_depth])
        pool = [e for e in pool if e in allowed]
    used: set[int] = set()
    for i in sorted(chosen, key=lambda e: (-score(e), e)):
        if score(i) > hi or i in params.protected or i in available:
            d.exact.append(i)
            continue
        settle_miss(d, i, pool, cached, used, chosen_set, params)
    return d


def settle_miss(d: TokenDecision, i: int, pool: Sequence[int], cached: AbstractSet[int], used: set[int],
                chosen_set: AbstractSet[int], params: SubstitutionParams) -> None:
    """The low-score miss i: an understudy (`pick_understudy`; then used), else a drop where allowed, else exact."""
    j, reason = pick_understudy(i, pool, cached, used, chosen_set, params)
    if j is not None:
        d.understudy[i] = (j, reason)
        used.add(j)
    elif i in params.drop_ok:
        d.dropped.append(i)
    else:
        d.exact.append(i)


def pick_understudy(i: int, pool: Sequence[int], cached: AbstractSet[int], used: AbstractSet[int],
                    chosen_set: AbstractSet[int], params: SubstitutionParams) -> tuple[int | None, str | None]:
    """(understudy, reason) for the low-score miss i, or (None, None). SMoE: the best-scoring band candidate of
    `pool` (E_s, best first) not yet used by the token. Plan: a profiled near-twin (err <= tau) of least error if one
    is cached, else the best-scoring band candidate (the router's own evidence)."""
    band = [j for j in pool if j not in used]
    if params.by_error:
        err = (params.error or {}).get(i, {})
        twins = [j for j, _ in (params.similar or {}).get(i, ())
                 if j in cached and j not in used and j not in chosen_set]
        if twins:
            return min(twins, key=lambda c: (err.get(c, float("inf")), twins.index(c))), "similarity"
    if band:
        return band[0], ("band" if band[0] in cached else "batch")
    return None, None


def decide_layer(scores: Sequence[Sequence[float] | ScoreMap], chosen: Sequence[Sequence[int]],
                 cached: AbstractSet[int], params: SubstitutionParams) -> list[TokenDecision]:
    """Decisions for every token of a layer call: scores [T] x ([E] or sparse map), chosen [T][k]."""
    if params.alpha <= 0.0:
        return [TokenDecision(exact=list(c)) for c in chosen]
    tops = [top_score_set(s, c, params.alpha) for s, c in zip(scores, chosen)]
    count = Counter(e for top in tops for e in top)
    out = []
    for s, c, top in zip(scores, chosen, tops):
        batch_top = {e for e, n in count.items() if n - (e in top) > 0}
        out.append(decide_token(s, c, cached, batch_top, params))
    return out
