"""The compiled cache model of the score-evicting policies (smoe, and plan without precision pools): one call of a
compiled kernel per layer call, over arrays.

It makes exactly the decisions of the reference `runtime.policy.schedule.CacheModel` for these policies (the tests
replay random and recorded traces through both, op for op, with the plan's near-twins, protected experts, drops,
pool depth, prefetch guard and the host/transfer split). The kernel is the reference's rules written over dense
per-layer arrays, each step a scan over the call's experts or a token's W scored experts (only the victim's argmin
scans all E), with the model's per-expert scratch, which each call clears where it wrote it:

  decide   per token, with S = S(k+1) of its top-W scores, hi = (1 + alpha) S, lo = (1 - alpha) S
           (runtime.policy.substitution): top-score experts (s > hi), protected, cached or (use_batch) another
           token's top-score experts run exactly; a low-score miss i takes the least-error cached near-twin (plan),
           else the best unused band expert (lo < s <= S, cached or batch-top, unchosen, among the token's d best
           unchosen with a pool depth), else is dropped where allowed, else runs exactly (loaded)
  window   the score window's step (per expert the mean score over the call's tokens) replaces its oldest step in
           the running sum: sum(e) -= old(e), then sum(e) += new(e); mean(e) = sum(e) / steps held
  victim   argmin (mean(e), e) over the layer's resident experts the call does not need (still) and, for a prefetch,
           that the prediction does not name
  ops      the reference's order: loads as slots allow (misses by (-best score, e), the host split's share on the
           host), the next layer's prefetches (predicted top-score experts by (-score, e), up to the budget; with the
           guard only over a victim of lower mean score), the cached experts' computes in ascending id (each freeing
           its slot for the next load), the host computes, each loaded expert's compute in load order
The state is what the rules read: residency, the prefetched marks and the score window, per layer. (The reference's
last use and use counts feed only lru/lfu/lfru, which this model does not run.)

Why compiled (numba), when the lossless fast model (runtime.policy.fast) and the lean model (runtime.policy.lean)
are plain Python: in the lean model smoe's substitution, score window and prefetch took 52.5 us per decode layer
call at batch 1 and 122.8 us at batch 3 on the 128-expert shape (`benchmarks/decisions.py` at 3cc8209), against a
goal of 50 us for all of the runtime's own work per call; a numpy version pays microseconds of dispatch per
operation. One compiled call makes the whole decision (what it costs now: the decisions section of
docs/BENCHMARKS.md). Kernels are compiled on first use (a runtime warms them when it loads, `warm_kernels`) and
cached on disk (`cache=True`). The executor's fused call (`decide_and_group`: the decision, then the call's pairs
grouped by serving expert, `served_groups`) is here too, with the kernels it calls: numba keys a kernel's disk cache
by its own file only. Called kernels are inlined where a call would pass many arrays (each array argument of a
compiled call costs reference counting: about 0.1 us a call with a dozen arrays).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from numba import njit

from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.schedule import Scores
from runtime.policy.substitution import SubstitutionParams, TokenDecision

KINDS = ("load", "prefetch", "compute", "host")                 # op kinds by code
LOAD, PREFETCH, COMPUTE, HOST = range(4)
REASONS = ("", "band", "batch", "similarity", "")               # pair actions: exact, the understudies, drop
EXACT, BAND, BATCH, SIMILARITY, DROP = range(5)
# counts vector: pairs hits misses host drops band batch similarity loads prefetch_issued prefetch_used
N_COUNTS = 11
HEAD = 2 + N_COUNTS                                             # the kernel's result: n_ops, leading loads, counts


def is_compiled(policy: PolicyConfig, params: Mapping[int, SubstitutionParams]) -> bool:
    """Whether the compiled model runs `policy`: score eviction and 0 <= alpha <= 1 in every layer (the band's
    lower edge is then >= 0, so only a token's scored experts can be in it)."""
    return policy.eviction == "score" and all(0.0 <= p.alpha <= 1.0 for p in params.values())


# ---- the kernel --------------------------------------------------------------------------------------------------
@njit(cache=True)
def _before(a_s, a_e, b_s, b_e):
    """(-a_s, a_e) < (-b_s, b_e): best score first, ties by lower id."""
    return a_s > b_s or (a_s == b_s and a_e < b_e)


@njit(cache=True)
def _best_first(ids, vals, n):
    """ids[:n] sorted in place by (-vals, id), vals moved along (insertion sort: n is a token's W scored experts,
    k, or a call's misses or predicted experts)."""
    for a in range(1, n):
        e, s = ids[a], vals[a]
        b = a - 1
        while b >= 0 and _before(s, e, vals[b], ids[b]):
            ids[b + 1], vals[b + 1] = ids[b], vals[b]
            b -= 1
        ids[b + 1], vals[b + 1] = e, s


@njit(cache=True, inline='always')
def rows_from_table(chosen, table, width):
    """`runtime.router.score_rows`'s rows as arrays (ids [T, W], scores [T, W] float64, lengths [T]): per token its
    k chosen experts, then its best W - k unchosen experts by (-score, id) (`runtime.router.top_ids`' order; none
    when W <= k), scores from the score table [T, E] float32; W = min(width, E). One pass over E per token, each
    unchosen expert inserted into the kept ones (best first) when it beats the worst kept: ids ascend, so a tie
    keeps the lower id."""
    t_n, k = chosen.shape
    e_n = table.shape[1]
    w = max(min(width, e_n), k)
    rid = np.empty((t_n, w), np.int64)
    rval = np.empty((t_n, w), np.float64)
    rlen = np.empty(t_n, np.int64)
    mark = np.zeros(e_n, np.uint8)                               # [E] token t's chosen
    for t in range(t_n):
        for p in range(k):
            e = chosen[t, p]
            rid[t, p], rval[t, p] = e, table[t, e]
            mark[e] = 1
        n = k
        for e in range(e_n):
            if mark[e]:
                continue
            s = np.float64(table[t, e])
            if n < w:
                a = n
                n += 1
            elif s > rval[t, w - 1]:
                a = w - 1
            else:
                continue
            while a > k and s > rval[t, a - 1]:
                rid[t, a], rval[t, a] = rid[t, a - 1], rval[t, a - 1]
                a -= 1
            rid[t, a], rval[t, a] = e, s
        for p in range(k):
            mark[chosen[t, p]] = 0
        rlen[t] = n
    return rid, rval, rlen


@njit(cache=True)
def _kth_next(rval, t, n, k, buf):
    """S(k+1) of token t's n scores (0 when n <= k); buf [>= n] scratch."""
    if n <= k:
        return 0.0
    for a in range(n):                                           # insertion sort, descending (n <= W)
        v = rval[t, a]
        b = a - 1
        while b >= 0 and buf[b] < v:
            buf[b + 1] = buf[b]
            b -= 1
        buf[b + 1] = v
    return buf[k]


@njit(cache=True)
def _victim(res_l, busy, wsum_l, held):
    """argmin (mean(e), e) over resident, not busy experts; -1 when there is none."""
    m = max(held, 1)
    best, best_mean = -1, 0.0
    for e in range(res_l.shape[0]):
        if res_l[e] and not busy[e]:
            mean = wsum_l[e] / m
            if best < 0 or mean < best_mean:
                best, best_mean = e, mean
    return best


@njit(cache=True)
def _admit(res, n_res, pf, li, e, v):
    """e enters layer index li in victim v's place (v < 0: a free slot); v's prefetched mark leaves with it."""
    if v >= 0:
        res[li, v] = 0
        pf[li, v] = 0
        n_res[li] -= 1
    res[li, e] = 1
    n_res[li] += 1


@njit(cache=True)
def _op(ops, n, kind, lid, e, v):
    """Write op n (kind code, layer id, expert, victim or -1); returns n + 1."""
    ops[n, 0], ops[n, 1], ops[n, 2], ops[n, 3] = kind, lid, e, v
    return n + 1


@njit(cache=True)
def _issue(li, lid, queue, q, n_load, res, n_res, slots, pending, pf, wsum, held, ops, n_ops, counts):
    """Load queue[q:n_load] into layer index li (layer id lid) as slots allow (a victim evicted when the layer is
    full); returns (q, n_ops)."""
    while q < n_load:
        e = queue[q]
        v = -1
        if n_res[li] >= slots[li]:
            v = _victim(res[li], pending, wsum[li], held[li])
            if v < 0:
                break
        _admit(res, n_res, pf, li, e, v)
        n_ops = _op(ops, n_ops, 0, lid, e, v)
        counts[8] += 1
        q += 1
    return q, n_ops


@njit(cache=True)
def ascending(ids, n):
    """ids[:n] sorted ascending in place (insertion sort: n is a call's few experts)."""
    for a in range(1, n):
        e = ids[a]
        b = a - 1
        while b >= 0 and ids[b] > e:
            ids[b + 1] = ids[b]
            b -= 1
        ids[b + 1] = e


def workspace(num_experts: int) -> np.ndarray:
    """The kernels' per-expert scratch (`schedule_kernel`, and `served_groups`'s first 2E words), zero between
    calls: int64 [7E + ceil(6E / 8)] = four int64 rows, three float64 rows, six uint8 rows."""
    e = num_experts
    return np.zeros(7 * e + (6 * e + 7) // 8, np.int64)


@njit(cache=True)
def schedule_kernel(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws,
                    rid, rval, rlen, chosen, pid, pval, plen, prefetch, budget, guard, host_split, c_load, c_host):
    """One layer call of layer index li (nli: the next MoE layer's index, -1 for the last), on the model's arrays
    by layer index (`CompiledCacheModel`: flags [4, L, E] uint8 = resident, prefetched, protected, drop_ok; ints
    [8, L] = resident count, slots, window head, steps held, pool depth (-1: none), layer id, use_batch, by_error;
    alphas [L]; the window's sums wsum [L, E], steps ring [L, n, E] and each step's experts ring_ids [L, n, 1 + E]
    int32 (their count first: a step's other entries are 0); near-twins tw_ids / tw_err [L, E, D], -1 padded; ws the
    per-expert scratch, `workspace`); rows rid / rval [T, W] with lengths rlen [T]; chosen [T, k]; the prediction's
    rows pid / pval / plen (no rows: no prediction). Returns one int64 array (`CompiledSchedule` reads it): [n_ops,
    leading loads (-1: not a direct call), counts (N_COUNTS), per token the chosen experts in the order the rule
    settles them [T, k], each one's action [T, k] and understudy [T, k] (-1: none), ops [n, 4] (kind code, layer id,
    expert, victim or -1)]; n_ops is -(2 + e) when no slot can be freed for expert e.

    Only the call's experts are visited: its chosen experts and understudies (`touched`), the scored experts of its
    tokens and the named ones of the prediction; a scan over all E experts is left only to the victim's argmin. The
    scratch rows are the model's, set for those experts and cleared for them before the kernel returns (whatever it
    returns), so no call allocates or zeroes per-expert memory: in a decode, where the caches are cold between layer
    calls, each fresh line a call writes costs a miss."""
    res, pf, protected, drop_ok = flags[0], flags[1], flags[2], flags[3]
    n_res, slots, head, held, depths, layer_ids, use_batch, by_error = (
        ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7])
    alpha, depth, lid = alphas[li], depths[li], layer_ids[li]
    t_n = chosen.shape[0]
    p_n = plen.shape[0]
    cap = 3 * t_n * k + budget + 1                               # ops at most: loads, computes, host computes
    out = np.empty(HEAD + 3 * t_n * k + 4 * cap, np.int64)
    out[:HEAD] = 0
    counts = out[2:HEAD]
    out_i = out[HEAD:HEAD + t_n * k].reshape((t_n, k))
    out_act = out[HEAD + t_n * k:HEAD + 2 * t_n * k].reshape((t_n, k))
    out_j = out[HEAD + 2 * t_n * k:HEAD + 3 * t_n * k].reshape((t_n, k))
    ops = out[HEAD + 3 * t_n * k:].reshape((cap, 4))
    e_n = res.shape[1]
    # per expert (the model's scratch, zero between calls): exact pairs; understudy pairs; tokens topping e;
    # whether the token at hand tops e; best score over the tokens that chose e; one token's scores (0: unscored);
    # the prediction's best score of e; flags
    exact_n, subs_n, top_n, own_top = ws[:e_n], ws[e_n:2 * e_n], ws[2 * e_n:3 * e_n], ws[3 * e_n:4 * e_n]
    wf = ws[4 * e_n:7 * e_n].view(np.float64)
    best, score, pmax = wf[:e_n], wf[e_n:2 * e_n], wf[2 * e_n:]
    wu = ws[7 * e_n:].view(np.uint8)
    is_chosen, used, pending = wu[:e_n], wu[e_n:2 * e_n], wu[2 * e_n:3 * e_n]
    named, seen, in_step = wu[3 * e_n:4 * e_n], wu[4 * e_n:5 * e_n], wu[5 * e_n:6 * e_n]
    # per call, two allocations: [w] per scored expert of a token; [2Tk] the call's experts, its misses, its cached
    # needed ones; [Pk] the prediction's named; [T] per token
    w_n = max(rid.shape[1], pid.shape[1], k)
    c_n = 2 * t_n * k
    ib = np.empty(3 * w_n + 3 * c_n + p_n * k, np.int64)
    pool, ranked, order = ib[:w_n], ib[w_n:2 * w_n], ib[2 * w_n:3 * w_n]
    touched, misses = ib[3 * w_n:3 * w_n + c_n], ib[3 * w_n + c_n:3 * w_n + 2 * c_n]
    cn, want = ib[3 * w_n + 2 * c_n:3 * w_n + 3 * c_n], ib[3 * w_n + 3 * c_n:]
    fb = np.empty(3 * w_n + c_n + p_n * k + t_n)
    pool_s, ranked_s, order_s = fb[:w_n], fb[w_n:2 * w_n], fb[2 * w_n:3 * w_n]
    miss_s, want_s = fb[3 * w_n:3 * w_n + c_n], fb[3 * w_n + c_n:3 * w_n + c_n + p_n * k]
    s_next = fb[3 * w_n + c_n + p_n * k:]
    is_top = np.zeros((t_n, k), np.uint8)                        # chosen[t, p] is a top-score expert of t
    n_t = 0
    for t in range(t_n):
        for w in range(rlen[t]):
            score[rid[t, w]] = rval[t, w]
        for p in range(k):
            e = chosen[t, p]
            if not seen[e]:
                seen[e], best[e] = 1, -np.inf
                touched[n_t] = e
                n_t += 1
            if score[e] > best[e]:
                best[e] = score[e]
        for w in range(rlen[t]):
            score[rid[t, w]] = 0.0
    counts[0] = t_n * k
    # ---- decisions (runtime.policy.substitution); no op is made before the ops below, so res[li] is the
    # residency the call starts with
    if alpha <= 0.0:
        for t in range(t_n):
            for p in range(k):
                e = chosen[t, p]
                out_i[t, p], out_act[t, p], out_j[t, p] = e, EXACT, -1
                exact_n[e] += 1
    else:
        for t in range(t_n):
            s_next[t] = _kth_next(rval, t, rlen[t], k, ranked_s)
            hi = (1.0 + alpha) * s_next[t]
            for w in range(rlen[t]):
                score[rid[t, w]] = rval[t, w]
            for p in range(k):
                e = chosen[t, p]
                if score[e] > hi:
                    is_top[t, p] = 1
                    top_n[e] += 1
            for w in range(rlen[t]):
                score[rid[t, w]] = 0.0
        for t in range(t_n):
            n = rlen[t]
            for w in range(n):
                score[rid[t, w]] = rval[t, w]
            for p in range(k):
                is_chosen[chosen[t, p]] = 1
                own_top[chosen[t, p]] = is_top[t, p]
            hi, lo, sn = (1.0 + alpha) * s_next[t], (1.0 - alpha) * s_next[t], s_next[t]
            # E_s: unchosen scored experts with lo < s <= S, cached or batch-top, best first
            n_pool = 0
            for w in range(n):
                e = rid[t, w]
                s = rval[t, w]
                if not is_chosen[e] and lo < s and s <= sn and (
                        res[li, e] or (use_batch[li] and top_n[e] - own_top[e] > 0)):
                    pool[n_pool], pool_s[n_pool] = e, s
                    n_pool += 1
            _best_first(pool, pool_s, n_pool)
            if depth >= 0 and n_pool > 0:                        # only among the d best unchosen
                n_r = 0
                for w in range(n):
                    if not is_chosen[rid[t, w]]:
                        ranked[n_r], ranked_s[n_r] = rid[t, w], rval[t, w]
                        n_r += 1
                _best_first(ranked, ranked_s, n_r)
                kept = 0
                for a in range(n_pool):
                    ok = False
                    for b in range(min(depth, n_r)):
                        ok = ok or ranked[b] == pool[a]
                    if ok:
                        pool[kept], pool_s[kept] = pool[a], pool_s[a]
                        kept += 1
                n_pool = kept
            for p in range(k):
                order[p] = chosen[t, p]
                order_s[p] = score[chosen[t, p]]
            _best_first(order, order_s, k)
            for p in range(k):
                i = order[p]
                out_i[t, p], out_j[t, p] = i, -1
                if order_s[p] > hi or protected[li, i] or res[li, i] or (use_batch[li] and top_n[i] - own_top[i] > 0):
                    out_act[t, p] = EXACT
                    exact_n[i] += 1
                    continue
                j, act = -1, EXACT
                if by_error[li]:                                     # the least-error cached near-twin (first on ties)
                    best_err = np.inf
                    for d in range(tw_ids.shape[2]):
                        c = tw_ids[li, i, d]
                        if c < 0:
                            break
                        if res[li, c] and not used[c] and not is_chosen[c] and (j < 0 or tw_err[li, i, d] < best_err):
                            j, best_err, act = c, tw_err[li, i, d], SIMILARITY
                if j < 0:
                    for a in range(n_pool):
                        if not used[pool[a]]:
                            j = pool[a]
                            act = BAND if res[li, j] else BATCH
                            break
                if j >= 0:
                    used[j] = 1
                    out_act[t, p], out_j[t, p] = act, j
                    subs_n[j] += 1
                    counts[5 + act - 1] += 1                     # band, batch, similarity
                    if not seen[j]:                              # (cached: never a miss, its best score unread)
                        seen[j], best[j] = 1, -np.inf
                        touched[n_t] = j
                        n_t += 1
                elif drop_ok[li, i]:
                    out_act[t, p] = DROP
                    counts[4] += 1
                else:
                    out_act[t, p] = EXACT
                    exact_n[i] += 1
            for w in range(n):
                score[rid[t, w]] = 0.0
            for p in range(k):
                is_chosen[chosen[t, p]] = 0
                own_top[chosen[t, p]] = 0
            for p in range(k):
                if out_j[t, p] >= 0:
                    used[out_j[t, p]] = 0
    # ---- the score window moves (the victims' key); a step's entries outside its experts are 0
    steps = ring_ids[li]                                         # [n, 1 + E]
    if held[li] == window:                                       # full: the oldest step leaves, its slot is reused
        old = head[li]
        for a in range(steps[old, 0]):
            e = steps[old, 1 + a]
            wsum[li, e] -= ring[li, old, e]
            ring[li, old, e] = 0.0
        head[li] = (old + 1) % window
    else:                                                        # (a slot not used yet: all 0)
        old = (head[li] + held[li]) % window
        held[li] += 1
    step = ring[li, old]                                         # [E] the step: mean score over the call's tokens
    n_s = 0
    for t in range(t_n):
        for w in range(rlen[t]):
            e = rid[t, w]
            step[e] += rval[t, w] if t_n == 1 else rval[t, w] / t_n
            if not in_step[e]:
                in_step[e] = 1
                steps[old, 1 + n_s] = e
                n_s += 1
    steps[old, 0] = n_s
    for a in range(n_s):
        e = steps[old, 1 + a]
        in_step[e] = 0
        wsum[li, e] += step[e]
    # ---- misses, the host split, the pair counts
    n_miss = n_cn = 0
    for a in range(n_t):
        e = touched[a]
        if exact_n[e] > 0 or subs_n[e] > 0:                     # needed: cached, or a miss
            if res[li, e]:
                cn[n_cn] = e
                n_cn += 1
            else:
                misses[n_miss], miss_s[n_miss] = e, (best[e] if best[e] > -np.inf else 0.0)
                n_miss += 1
    _best_first(misses, miss_s, n_miss)
    ascending(cn, n_cn)
    n_load = n_miss
    if host_split and n_miss > 0:                                # argmin_n max(n c_load, (N - n) c_host), ties: more loads
        best_cost = np.inf
        for m in range(n_miss + 1):
            cost = max(m * c_load, (n_miss - m) * c_host)
            if cost <= best_cost:
                best_cost, n_load = cost, m
    # pending: needed, not on the host, not yet computed
    for a in range(n_load):
        pending[misses[a]] = 1
    for a in range(n_cn):
        e = cn[a]
        pending[e] = 1
        if pf[li, e]:
            counts[10] += 1
            pf[li, e] = 0
    for a in range(n_t):
        e = touched[a]
        if exact_n[e] > 0:                                       # hits; misses (loaded: pending) or host
            counts[1 if res[li, e] else 2 if pending[e] else 3] += exact_n[e]
    # ---- ops
    # (each _issue guarded by q < n_load: a call with its eleven arrays costs about 0.1 us, the arrays' reference
    # counts, and most decode calls have nothing (more) to load)
    n_ops = q = 0
    if n_load > 0:
        q, n_ops = _issue(li, lid, misses, q, n_load, res, n_res, slots, pending, pf, wsum, held, ops, n_ops, counts)
    n_want = 0
    if prefetch and nli >= 0 and p_n > 0:
        # named: predicted, busy in the next layer; pmax: its best predicted score
        for t in range(p_n):
            n = plen[t]
            for w in range(n):
                ranked[w], ranked_s[w] = pid[t, w], pval[t, w]
            _best_first(ranked, ranked_s, n)
            thr = (1.0 + alphas[nli]) * (ranked_s[k] if n > k else 0.0)
            for w in range(min(k, n)):
                e = ranked[w]
                if ranked_s[w] > thr:
                    if not named[e]:
                        named[e], pmax[e] = 1, max(0.0, ranked_s[w])
                        want[n_want] = e
                        n_want += 1
                    elif ranked_s[w] > pmax[e]:
                        pmax[e] = ranked_s[w]
        for a in range(n_want):
            want_s[a] = pmax[want[a]]
        _best_first(want, want_s, n_want)
        m = max(held[nli], 1)
        for a in range(min(budget, n_want)):
            e = want[a]
            if res[nli, e]:
                continue
            v = -1
            if n_res[nli] >= slots[nli]:
                v = _victim(res[nli], named, wsum[nli], held[nli])
                if guard and (v < 0 or wsum[nli, v] / m >= pmax[e]):
                    continue
                if v < 0:
                    break
            _admit(res, n_res, pf, nli, e, v)
            pf[nli, e] = 1
            n_ops = _op(ops, n_ops, 1, layer_ids[nli], e, v)
            counts[8] += 1
            counts[9] += 1
    for a in range(n_cn):                                        # the cached needed experts, ascending
        e = cn[a]
        n_ops = _op(ops, n_ops, 2, lid, e, -1)
        pending[e] = 0
        if q < n_load:
            q, n_ops = _issue(li, lid, misses, q, n_load, res, n_res, slots, pending, pf, wsum, held, ops,
                              n_ops, counts)
    for a in range(n_load, n_miss):
        n_ops = _op(ops, n_ops, 3, lid, misses[a], -1)
    stuck = -1
    for a in range(n_load):
        e = misses[a]
        if not res[li, e] and q < n_load:
            q, n_ops = _issue(li, lid, misses, q, n_load, res, n_res, slots, pending, pf, wsum, held, ops,
                              n_ops, counts)
        if not res[li, e]:
            stuck = e
            break
        n_ops = _op(ops, n_ops, 2, lid, e, -1)
        pending[e] = 0
        if q < n_load:
            q, n_ops = _issue(li, lid, misses, q, n_load, res, n_res, slots, pending, pf, wsum, held, ops,
                              n_ops, counts)
    # ---- the scratch cleared for the call's experts (zero for the next call, whatever this one returns)
    for a in range(n_t):
        e = touched[a]
        exact_n[e] = subs_n[e] = top_n[e] = 0
        best[e] = 0.0
        pending[e] = seen[e] = 0
    for a in range(n_want):
        named[want[a]] = 0
        pmax[want[a]] = 0.0
    if stuck >= 0:
        out[0] = -(2 + stuck)
        return out
    out[0] = n_ops
    lead = 0
    while lead < n_ops and ops[lead, 0] < 2:
        lead += 1
    out[1] = lead
    for a in range(lead, n_ops):
        if ops[a, 0] != 2:
            out[1] = -1
    return out


@njit(cache=True, inline='always')
def schedule_from_table(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws, width,
                        prefetch, budget, guard, host_compute, host_max, chosen, table, p_chosen, p_table, c_load,
                        c_host):
    """`schedule_kernel` on a routing as the router returns it: chosen [T, k] and the score table [T, E], and the
    same of the prediction (no tokens: none); the rows made by `rows_from_table` (width W). Its arguments up to
    host_max are the layer's and the policy's (`CompiledCacheModel.kernel_prefix`): the policy prefetches when it
    does and a prediction came; splits misses with the host when it computes there and T <= host_max."""
    rid, rval, rlen = rows_from_table(chosen, table, width)
    pid, pval, plen = rows_from_table(p_chosen, p_table, width)
    return schedule_kernel(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws,
                           rid, rval, rlen, chosen, pid, pval, plen, prefetch and plen.shape[0] > 0, budget, guard,
                           host_compute and chosen.shape[0] <= host_max, c_load, c_host)


# ---- the executor's fused call: the decision, then the call's pairs grouped by serving expert --------------------
# (in this module with the schedule kernel they call: numba's disk cache is keyed by each kernel's own source file,
# so a kernel must live in the file of every kernel it calls, or it would run a stale copy of them after an edit)
@njit(cache=True)
def _bf16_bits(b):
    """The bfloat16 bits of a finite float32 whose bits are b (int64): torch's float32 -> bfloat16 cast, round to
    nearest, ties to even."""
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(cache=True)
def bf16_values(w):
    """w [T, k] float32 (finite) rounded to bfloat16 precision, as float32 (a new array; on values bf16 already
    holds, the identity)."""
    out = np.empty_like(w)
    u, r = w.view(np.uint32), out.view(np.uint32)
    for t in range(w.shape[0]):
        for q in range(w.shape[1]):
            r[t, q] = _bf16_bits(np.int64(u[t, q])) << 16
    return out


@njit(cache=True, inline='always')
def served_groups(chosen, order, action, understudy, w, gate, mode, bf16, ws):
    """A call's (token, serving expert) pairs grouped by expert in ascending id: first the expert's own exact pairs
    in (position, token) order, then the tokens it stands in for, in token order (`group_served`).
    chosen [T, k]; order, action, understudy [T, k] as the schedule kernel returns them; w [T, k] float32 routing
    weights (bf16: the values the router rounds to bfloat16 weights, rounded here, `bf16_values`); gate [T, E]
    float32; mode: 0 own (coef x gate_j, a float32 product), 1 replaced (the replaced expert's weight), 2 auto
    (replaced for a near-twin). coef, a token's weight per unit of gate, is `Routing.coef`'s
    (runtime.router), computed here from w and gate:
        coef = float32(sum_p w[t, p] / max(sum_p gate[t, chosen[t, p]], 1e-30))   sums and quotient in float64
    ws: int64 scratch [>= 2E], zero, left zero (the compiled model's `workspace`: no per-expert memory allocated or
    zeroed per call).
    Returns the groups as one int64 array (one array handed back to Python, not four): [n, N, N', experts [n]
    ascending, bounds [n + 1], tok [N], by_token [N'], the weights [N] in W words] (by_token: the pairs in (token,
    group) order when every token has the same number of pairs, N' = N; else none, N' = 0); the weights' words hold
    their bfloat16 bits with bf16 (4 a word, W = ceil(N / 4)), else their float32 values (2 a word, W = ceil(N / 2)),
    which `_pair_groups` views as the weights' tensor (bfloat16: no cast)."""
    t_n, k = chosen.shape
    e_n = gate.shape[1]
    if bf16:
        w = bf16_values(w)
    act = np.empty((t_n, k), np.int64)                           # [T, k] by routing position
    und = np.empty((t_n, k), np.int64)
    for t in range(t_n):
        for q in range(k):
            for p in range(k):
                if chosen[t, p] == order[t, q]:
                    act[t, p], und[t, p] = action[t, q], understudy[t, q]
    n_of, fill = ws[:e_n], ws[e_n:2 * e_n]                        # [E] pairs of each serving expert; its next row
    per_tok = np.zeros(t_n, np.int64)
    serving = np.empty(t_n * k, np.int64)
    n_e = 0
    for t in range(t_n):
        for p in range(k):
            if act[t, p] == DROP:
                continue
            e = chosen[t, p] if act[t, p] == EXACT else und[t, p]
            if n_of[e] == 0:
                serving[n_e] = e
                n_e += 1
            n_of[e] += 1
            per_tok[t] += 1
    experts = serving[:n_e]
    ascending(experts, n_e)
    bounds = np.zeros(n_e + 1, np.int64)
    for a in range(n_e):
        e = experts[a]
        fill[e] = bounds[a]
        bounds[a + 1] = bounds[a] + n_of[e]
    n = bounds[n_e]
    uniform = t_n > 0
    for t in range(t_n):
        uniform = uniform and per_tok[t] == per_tok[0]
    n_b = n if uniform else 0
    c = 4 + 2 * n_e + n + n_b                                    # the weights' first word
    grp = np.empty(c + ((n + 3) // 4 if bf16 else (n + 1) // 2), np.int64)
    grp[0], grp[1], grp[2] = n_e, n, n_b
    grp[3:3 + n_e] = experts
    grp[3 + n_e:4 + 2 * n_e] = bounds
    tok = grp[4 + 2 * n_e:4 + 2 * n_e + n]
    if bf16:                                                     # float32 values, then their bits in the words
        wt = np.empty(n, np.float32)
    else:
        wt = grp[c:].view(np.float32)[:n]
    coef = np.empty(t_n, np.float32)                             # [T] (read only for an own-weight understudy)
    for t in range(t_n):
        sw, sg = 0.0, 0.0
        for q in range(k):
            sw += np.float64(w[t, q])
            sg += np.float64(gate[t, chosen[t, q]])
        coef[t] = np.float32(sw / max(sg, 1e-30))
    for p in range(k):
        for t in range(t_n):
            if act[t, p] == EXACT:
                e = chosen[t, p]
                tok[fill[e]], wt[fill[e]] = t, w[t, p]
                fill[e] += 1
    for t in range(t_n):
        for p in range(k):
            if act[t, p] != EXACT and act[t, p] != DROP:
                j = und[t, p]
                tok[fill[j]] = t
                if mode == 1 or (mode == 2 and act[t, p] == SIMILARITY):
                    wt[fill[j]] = w[t, p]
                else:
                    wt[fill[j]] = np.float32(np.float64(coef[t]) * np.float64(gate[t, j]))
                fill[j] += 1
    for a in range(n_e):                                         # the scratch zero again
        n_of[experts[a]] = fill[experts[a]] = 0
    if bf16:
        wb, u = grp[c:].view(np.uint16), wt.view(np.uint32)
        for r in range(n):
            wb[r] = _bf16_bits(np.int64(u[r]))
    if not uniform:
        return grp
    by_token = grp[4 + 2 * n_e + n:c]                            # a stable counting sort of the rows by token
    nxt = np.zeros(t_n, np.int64)
    for r in range(n):
        t = tok[r]
        by_token[t * per_tok[0] + nxt[t]] = r
        nxt[t] += 1
    return grp


@njit(cache=True, inline='always')
def decide_and_group(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws, width,
                     prefetch, budget, guard, host_compute, host_max, chosen, table, p_chosen, p_table, c_load, c_host,
                     w, gate, mode, bf16):
    """The compiled model's decision (`schedule_from_table`, its arguments first) and its pairs grouped by serving
    expert (`served_groups`: w [T, k] float32 routing weights, gate [T, E] float32, mode, bf16), in one compiled call:
    one int64 array: the schedule's (`CompiledSchedule`), up to its last op (`CompiledSchedule.end`), then the groups
    (`runtime.expert_compute.schedule_and_group` reads both); the schedule's alone when no slot can be freed."""
    out = schedule_from_table(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws, width,
                              prefetch, budget, guard, host_compute, host_max, chosen, table, p_chosen, p_table,
                              c_load, c_host)
    if out[0] < 0:
        return out
    t_n = chosen.shape[0]
    a = HEAD
    order = out[a:a + t_n * k].reshape((t_n, k))
    action = out[a + t_n * k:a + 2 * t_n * k].reshape((t_n, k))
    understudy = out[a + 2 * t_n * k:a + 3 * t_n * k].reshape((t_n, k))
    grp = served_groups(chosen, order, action, understudy, w, gate, mode, bf16, ws)
    end = HEAD + 3 * t_n * k + 4 * out[0]
    both = np.empty(end + grp.shape[0], np.int64)
    both[:end] = out[:end]
    both[end:] = grp
    return both


@njit(cache=True)
def decide_and_group_pair(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws, width,
                          prefetch, budget, guard, host_compute, host_max, idx, w, gate, c_load, c_host, mode, bf16):
    """`decide_and_group` of a paired routing's arrays as the router made them (`runtime.router.pair_arrays`:
    idx [T, 2, k] int64, w [T, 2, k] float32, gate [T, 2, E] float32; half 0 the layer's routing, half 1 the next
    layer's prediction, the gate its score table), its halves taken here: no Python-side view or copy per half."""
    chosen, table = np.ascontiguousarray(idx[:, 0]), np.ascontiguousarray(gate[:, 0])
    return decide_and_group(li, nli, k, flags, ints, alphas, wsum, ring, ring_ids, tw_ids, tw_err, window, ws, width,
                            prefetch, budget, guard, host_compute, host_max, chosen, table,
                            np.ascontiguousarray(idx[:, 1]), np.ascontiguousarray(gate[:, 1]), c_load, c_host,
                            np.ascontiguousarray(w[:, 0]), table, mode, bf16)


# ---- the model -----------------------------------------------------------------------------------------------------
class CompiledSchedule:
    """`LayerSchedule`'s contract (decisions, ops, counts) over the kernel's result, each built when read.

    Per token the chosen experts in the order the rule settles them (`chosen_order` [T, k]), each one's action
    (`action` [T, k]: EXACT, BAND, BATCH, SIMILARITY, DROP) and understudy (`understudy` [T, k], -1: none);
    `count_array` [N_COUNTS]; `substituted`: whether any pair is served otherwise than exactly; `leading_loads`: n
    when the ops are n loads and prefetches, then only slot computes (a direct call), else -1; `end`: the index in
    the kernel's array after the last op (a fused kernel puts more after it)."""

    __slots__ = ("count_array", "substituted", "leading_loads", "end", "_out", "_tk", "_n", "_flat", "_ops", "_dec")

    def __init__(self, out: np.ndarray, t_n: int, k: int):
        head = out[:HEAD].tolist()
        self.count_array = head[2:]
        self.substituted = any(head[6:10])                     # drops, band, batch, similarity
        self.leading_loads = head[1]
        a = HEAD + 3 * t_n * k
        self._out, self._tk, self._n, self.end = out, (t_n, k), (a, head[0]), a + 4 * head[0]
        self._flat = self._ops = self._dec = None

    def _part(self, i: int) -> np.ndarray:
        t_n, k = self._tk
        a = HEAD + i * t_n * k
        return self._out[a:a + t_n * k].reshape(t_n, k)

    @property
    def chosen_order(self) -> np.ndarray:
        return self._part(0)

    @property
    def action(self) -> np.ndarray:
        return self._part(1)

    @property
    def understudy(self) -> np.ndarray:
        return self._part(2)

    @property
    def flat_ops(self) -> list[int]:
        """The ops as one list, four ints each: kind code (LOAD, PREFETCH, COMPUTE, HOST), layer, expert, victim
        (-1: none)."""
        if self._flat is None:
            a, n = self._n
            self._flat = self._out[a:a + 4 * n].tolist()
        return self._flat

    @property
    def ops(self) -> list[tuple[str, int, int, int | None]]:
        if self._ops is None:
            o = self.flat_ops
            self._ops = [(KINDS[o[i]], o[i + 1], o[i + 2], o[i + 3] if o[i + 3] >= 0 else None)
                         for i in range(0, len(o), 4)]
        return self._ops

    @property
    def decisions(self) -> list[TokenDecision]:
        if self._dec is None:
            self._dec = []
            for ii, aa, jj in zip(self.chosen_order.tolist(), self.action.tolist(), self.understudy.tolist()):
                d = TokenDecision()
                for i, a, j in zip(ii, aa, jj):
                    if a == EXACT:
                        d.exact.append(i)
                    elif a == DROP:
                        d.dropped.append(i)
                    else:
                        d.understudy[i] = (j, REASONS[a])
                self._dec.append(d)
        return self._dec

    @property
    def counts(self) -> Counts:
        c = self.count_array
        return Counts(pairs=c[0], hits=c[1], misses=c[2], host=c[3], drops=c[4],
                      understudies={"band": c[5], "similarity": c[7], "batch": c[6]},
                      loads=c[8], prefetch_issued=c[9], prefetch_used=c[10])


def decision_arrays(decisions: Sequence[TokenDecision], chosen: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decisions as a compiled schedule's arrays: (order, action, understudy) [T, k], the chosen experts in routing
    order, each one's action (EXACT, BAND, BATCH, SIMILARITY, DROP) and understudy (-1: none)."""
    action = np.full(chosen.shape, EXACT, np.int64)
    understudy = np.full(chosen.shape, -1, np.int64)
    code = {"band": BAND, "batch": BATCH, "similarity": SIMILARITY}
    for t, (d, ch) in enumerate(zip(decisions, chosen.tolist())):
        for i, (j, reason) in d.understudy.items():
            p = ch.index(i)
            action[t, p], understudy[t, p] = code[reason], j
        for i in d.dropped:
            action[t, ch.index(i)] = DROP
    return chosen, action, understudy


class CompiledCacheModel:
    """`CacheModel`'s contract for the score-evicting policies (`is_compiled`), decided by the compiled kernel."""

    def __init__(self, slots: Mapping[int, int], num_experts: int, top_k: int, policy: PolicyConfig,
                 params: Mapping[int, SubstitutionParams], initial: Mapping[int, Sequence[int]] | None = None,
                 host_batch_max: int = 8):
        assert is_compiled(policy, params), f"policy {policy.name}: not a score-evicting policy with 0 <= alpha <= 1"
        self.e, self.k, self.policy, self.params = num_experts, top_k, policy, params
        self.layers = list(slots)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.next_index = {l: self.index.get(n, -1) for l, n in zip(self.layers, self.layers[1:] + [None])}
        self.host_batch_max = host_batch_max
        n_l, e, n = len(self.layers), num_experts, policy.window
        ps = [params[l] for l in self.layers]
        self.flags = np.zeros((4, n_l, e), np.uint8)                                   # [4, L, E]
        self.res, self.pf, self.protected, self.drop_ok = self.flags                  # resident, prefetched (unused)
        self.ints = np.zeros((8, n_l), np.int64)                                       # [8, L]
        self.n_res, self.slots, self.head, self.held, depths, ids, batch, by_error = self.ints
        self.slots[:] = [slots[l] for l in self.layers]
        depths[:] = [-1 if p.pool_depth is None else p.pool_depth for p in ps]
        ids[:] = self.layers
        batch[:] = [p.use_batch for p in ps]
        by_error[:] = [p.by_error for p in ps]
        self.alphas = np.array([p.alpha for p in ps], dtype=np.float64)                # [L]
        self.wsum = np.zeros((n_l, e))                                                 # [L, E] window sums
        self.ring = np.zeros((n_l, n, e))                                              # [L, n, E] window steps (0: unscored)
        self.ring_ids = np.zeros((n_l, n, 1 + e), np.int32)                            # [L, n, 1 + E] their experts
        self.ws = workspace(e)                                                         # the kernels' scratch
        d = max([len(v) for p in ps for v in (p.similar or {}).values()] + [1])
        self.tw_ids = np.full((n_l, e, d), -1, np.int64)                               # [L, E, D] near-twins
        self.tw_err = np.full((n_l, e, d), np.inf)                                     # [L, E, D] their errors
        for li, p in enumerate(ps):
            self.protected[li, list(p.protected)] = 1
            self.drop_ok[li, list(p.drop_ok)] = 1
            for i, twins in (p.similar or {}).items():
                err = (p.error or {}).get(i, {})
                for a, (j, _) in enumerate(twins):
                    self.tw_ids[li, i, a], self.tw_err[li, i, a] = j, err.get(j, np.inf)
        self.budget = policy.prefetch_max or top_k
        self.guard = policy.prefetch_guard
        # per layer the kernel's first arguments (its arrays change in place only), and an empty prediction
        self._static = {l: (self.index[l], self.next_index[l], top_k, self.flags, self.ints, self.alphas, self.wsum,
                            self.ring, self.ring_ids, self.tw_ids, self.tw_err, n, self.ws) for l in self.layers}
        self.no_prediction = _no_prediction(top_k, e)
        self._prefix: dict[tuple[int, int], tuple] = {}                        # (layer, width) -> kernel_prefix
        for l, es in (initial or {}).items():
            li = self.index[l]
            for x in es:
                if not self.res[li, x] and self.n_res[li] < self.slots[li]:
                    self.res[li, x] = 1
                    self.n_res[li] += 1

    @property
    def resident(self) -> dict[int, set[int]]:
        """Per layer the resident experts (a fresh copy)."""
        return {l: set(np.flatnonzero(self.res[li]).tolist()) for li, l in enumerate(self.layers)}

    @property
    def prefetched(self) -> dict[int, set[int]]:
        """Per layer the prefetched experts not used since (a fresh copy)."""
        return {l: set(np.flatnonzero(self.pf[li]).tolist()) for li, l in enumerate(self.layers)}

    def window_sums(self) -> dict[int, list[float]]:
        """Per layer the score window's running sums [E] (the reference's `ScoreWindow._sum`)."""
        return {l: self.wsum[li].tolist() for li, l in enumerate(self.layers)}

    def result(self, layer: int, out: np.ndarray, t_n: int) -> CompiledSchedule:
        """The schedule of a layer call of t_n tokens from the kernel's array (`kernel_args`)."""
        if out[0] < 0:
            raise RuntimeError(f"layer {layer}: no slot can be freed for expert {-int(out[0]) - 2}")
        return CompiledSchedule(out, t_n, self.k)

    def schedule(self, layer: int, rows: Sequence[Scores], chosen: Sequence[Sequence[int]],
                 prediction: Sequence[Scores] | None = None, c_load: float = 1.0, c_host: float = 1.0
                 ) -> CompiledSchedule:
        """`CacheModel.schedule`'s contract: rows, per token its top-W scores; chosen [T][k]; prediction, per token
        the next layer's predicted top-W scores."""
        rid, rval, rlen = _rows(rows)
        pid, pval, plen = _rows(prediction or [])
        ch = np.asarray(chosen, dtype=np.int64).reshape(len(chosen), self.k)
        p = self.policy
        return self.result(layer, schedule_kernel(
            *self._static[layer], rid, rval, rlen, ch, pid, pval, plen,
            p.prefetch and prediction is not None, self.budget, self.guard,
            p.host_compute and len(chosen) <= self.host_batch_max, float(c_load), float(c_host)), len(chosen))

    def schedule_table(self, layer: int, chosen: np.ndarray, table: np.ndarray, width: int,
                       prediction: tuple[np.ndarray, np.ndarray] | None = None, c_load: float = 1.0,
                       c_host: float = 1.0) -> CompiledSchedule:
        """`schedule` on a routing as the router returns it: chosen [T, k] int64 and the score table [T, E] float32,
        and the same two of the prediction (`runtime.router.call_arrays`); `runtime.router.score_rows`' rows of
        width `width`, made in the kernel."""
        pred = prediction if prediction is not None else self.no_prediction
        return self.result(layer, schedule_from_table(*self.kernel_prefix(layer, width), chosen, table, *pred,
                                                      float(c_load), float(c_host)), chosen.shape[0])

    def kernel_prefix(self, layer: int, width: int) -> tuple:
        """`schedule_from_table`'s arguments before the call's arrays: the layer's (its arrays change in place only)
        and the policy's, made once per layer and width (a kernel that calls it takes these first)."""
        key = (layer, width)
        pre = self._prefix.get(key)
        if pre is None:
            p = self.policy
            pre = self._prefix[key] = (*self._static[layer], width, p.prefetch, self.budget, self.guard,
                                       p.host_compute, self.host_batch_max)
        return pre


def _no_prediction(k: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """A prediction of no tokens (the kernel's arguments keep one type)."""
    return np.empty((0, k), np.int64), np.empty((0, e), np.float32)


def _rows(rows: Sequence[Scores]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score dicts as the kernel's rows: ids [T, W] int64, scores [T, W] float64, lengths [T] (W: the longest)."""
    w = max([len(r) for r in rows] + [1])
    rid = np.zeros((len(rows), w), np.int64)
    rval = np.zeros((len(rows), w))
    rlen = np.array([len(r) for r in rows], dtype=np.int64)
    for t, r in enumerate(rows):
        rid[t, :len(r)] = list(r.keys())
        rval[t, :len(r)] = list(r.values())
    return rid, rval, rlen


def warm_kernels() -> None:
    """Compile the runtime's kernel for its argument types (or load it from numba's disk cache), on a throwaway
    one-layer model, so that a runtime's first layer call does not (the runtime calls it when it loads)."""
    from runtime.policy.config import preset
    pol = preset("smoe")
    model = CompiledCacheModel({0: 2, 1: 2}, 4, 2, pol, {0: SubstitutionParams(alpha=pol.alpha),
                                                          1: SubstitutionParams(alpha=pol.alpha)})
    chosen, table = np.array([[0, 1]], np.int64), np.full((1, 4), 0.25, np.float32)
    model.schedule_table(0, chosen, table, 4, (chosen, table))
