"""`compile_plan(...)`: a profile + a budget + a target -> a Plan, with predictions from the trace simulator.

Steps: memory split (compiler.memory) -> substitution map (compiler.substitution_map) -> slots per layer by
simulated marginal gain (compiler.allocate) -> search over the substitution rule (alpha, pool depth, drops, tau)
and then prefetch, replaying the trace through the runtime's own cache model (compiler.simulator) -> predictions for
the plan and for the baselines at the same budget (compiler.predict.BASELINES: lru, lfu, lfru, static, smoe and the
oracle, Belady's bound on lossless caching).

The accuracy cost of a candidate ("error") is its predicted perplexity increase from the profile's measured loss
sensitivity (compiler.loss_model); a profile made with --sensitivity-tokens 0 falls back to the relative output
error (share of routed gate mass replaced by profiled error), a cruder proxy. Where the profile kept its
measurements per calibration window (format 4), the error limit applies to the upper end of the predicted
increase's 95% interval (`ppl_high`), not to its middle.
  --tpot-target R:  the candidate of least error whose modeled TPOT <= R (else the fastest one);
  --max-error E:    the candidate with the most hits whose error <= E;
  neither:          the least modeled TPOT whose error <= the default (perplexity +0.5%; proxy: 2% of the mass);
                    candidates within 1% of that TPOT count as ties, won by the most hits (an understudy and a drop
                    cost about the same measured loss, and an understudy keeps the token's expert count).
(compiler.objective holds these rules.)
Prefetch only moves loads earlier (and may displace cached experts), so it is tried on the best rules, judged by TPOT.
Precision (compiler.precision; when the profile measured quantization sensitivity and --precision is not off): every
option of per-class precisions is allocated its pools' slots under the same bytes and replayed with the lossless
rule and with the best native rule; the rule search is then repeated on the best option, and the objective chooses
among all candidates, native and quantized alike.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from pathlib import Path

from artifacts.errors import UserError
from artifacts.header import new_header, sha256_dir
from artifacts.plan import EXPERT_DTYPES, FORMAT, FORMAT_VERSION, Plan, PlanChoices
from artifacts.profile import Profile
from compiler.allocate import allocate_slots, hit_curves
from compiler.auto_budget import auto_budget, check_headroom, is_auto
from compiler.loss_model import LossModel
from compiler.memory import split_budget
from compiler.objective import Objective
from compiler.precision import CHOICES as PRECISIONS, allocate_pools, options, pool_initial
from compiler.predict import BASELINES, initial_residents, simulate_baseline, simulate_plan
from compiler.simulator import Costs
from compiler.substitution_map import TWIN_MAX_ERROR, build_substitution_map
from compiler.targets import load_target
from runtime.policy.plan_params import plan_policy

DEFAULT_MAX_PPL = 0.005             # default error limit with a loss model: perplexity +0.5%
DEFAULT_MAX_ERROR = 0.02            # without one: 2% of the routed gate mass replaced by output error
ALPHAS = (0.0, 0.25, 0.5, 0.8, 1.0, 1.2, 2.0)
DEPTHS = (0, 1, 2, 3)                   # band understudies among the token's d best inactive experts
TAUS = (0.3, 0.6, TWIN_MAX_ERROR)     # near-twin error thresholds tried
PREFETCH_MAX = (1, 2)
PREFETCH_TRIALS = 4                  # best rules on which prefetch is tried


@dataclass(frozen=True)
class CompileConfig:
    budget: str = "25%"                # "25%", "12GiB", or "auto" (free memory - headroom; compiler.auto_budget)
    target: str = "dev-emulated"
    tpot_target_ms: float | None = None
    max_error: float | None = None
    batch: int = 1
    context: int = 2048
    search_tokens: int = 1024          # trace tokens replayed per search candidate
    predict_tokens: int = 8192         # trace tokens replayed for the final predictions
    top_n: int = 8                     # ranked understudies kept per expert
    protect_frac: float = 0.1          # share of experts (by importance) never substituted
    window: int = 16                   # eviction window n (decode steps)
    headroom: str | None = None        # budget "auto" only: SIZE or P% of free left unused (default 10%, >= 1 GiB)
    precision: str = "auto"            # compiler.precision.CHOICES: off | auto | int8 | int4 (the lowest allowed)


def _distinct_taus(subs_map: dict[int, dict]) -> list[float]:
    """The taus of TAUS that admit different sets of similarity understudies (the others replay identically)."""
    errs = sorted(err for layer in subs_map.values() for ranked in layer["substitutes"].values() for _, _, err in ranked)
    out, seen = [], None
    for tau in TAUS:
        n = bisect.bisect_right(errs, tau)
        if n != seen:
            out.append(tau)
            seen = n
    return out


def compile_plan(profile_dir: str | Path, config: CompileConfig = CompileConfig(), log=print) -> Plan:
    if config.tpot_target_ms is not None and config.max_error is not None:
        raise UserError("give --tpot-target or --max-error, not both")
    check_headroom(config.budget, config.headroom)
    if config.precision not in PRECISIONS:
        raise UserError(f"--precision {config.precision!r}: choose one of {', '.join(PRECISIONS)}")
    target = load_target(config.target)
    profile = Profile.load(profile_dir)
    if not profile.trace or profile.trace["ids"].shape[0] == 0:
        raise UserError(f"profile {profile_dir} has no routing trace; re-run moe-profile")
    quant = profile.quant_sensitivity
    if config.precision in ("int8", "int4") and (quant is None or profile.sensitivity is None):
        raise UserError(f"--precision {config.precision} needs a profile that measured what quantizing experts "
                        "costs; re-run moe-profile with --quant-tokens N (N > 0) and --sensitivity-tokens N")
    if config.precision in ("int8", "int4") and profile.header["model"]["checkpoint_dtype"] not in EXPERT_DTYPES:
        raise UserError(f"--precision {config.precision}: the checkpoint's experts are already "
                        f"{profile.header['model']['checkpoint_dtype']}; precision plans quantize float experts")
    model = profile.header["model"]
    budget, auto = config.budget, None
    if is_auto(budget):                 # measured on this machine, then split like any absolute budget
        auto = auto_budget(model, target, config.batch, config.context, config.headroom)
        log(auto.describe())
        budget = f"{auto.budget_bytes}B"
    split = split_budget(budget, model, target, config.batch, config.context)
    layers, e, k = profile.moe_layers, profile.num_experts, profile.top_k
    costs = Costs.of(target, model)
    subs_map = build_substitution_map(profile, config.top_n, config.protect_frac)
    host = target.host_mem_bandwidth < target.device_mem_bandwidth and target.link_bandwidth < target.host_mem_bandwidth
    n_search = min(config.search_tokens, profile.trace["ids"].shape[0])

    loss_model = LossModel.from_profile(profile)
    metric = "ppl_increase" if loss_model is not None else "relative_error"
    limit = config.max_error if config.max_error is not None else (
        DEFAULT_MAX_PPL if loss_model is not None else DEFAULT_MAX_ERROR)

    # slots per layer by marginal gain (under the plan policy at a middle setting)
    middle = PlanChoices(alpha=0.5, tau=0.6, pool_depth=2, drop_misses=True, prefetch=False, prefetch_max=None,
                         window=config.window, host_compute=False)
    base, base_params = plan_policy(middle, layers, subs_map)
    curves = hit_curves(profile.trace, layers, e, k, base, base_params, max_slots=min(e, split.total_slots),
                        tokens=min(n_search, 1024))
    slots = allocate_slots(curves, split.total_slots, e)
    initial = initial_residents(profile, slots)
    width = int(profile.header["trace"]["width"])

    def choice(alpha, depth, drops, tau, pmax) -> PlanChoices:
        return PlanChoices(alpha=alpha, tau=tau, pool_depth=depth, drop_misses=drops, prefetch=pmax > 0,
                           prefetch_max=pmax or None, window=config.window, host_compute=host, width=width)

    native = profile.header["model"]["checkpoint_dtype"]
    layouts: dict[str, tuple] = {native: (None, slots, initial)}      # precision option -> (pools, slots, initial)

    def run(alpha, depth, drops, tau, pmax, option=native):
        c = choice(alpha, depth, drops, tau, pmax)
        pools, sl, init = layouts[option]
        r = simulate_plan(profile, sl, c, subs_map, costs, n_search, loss_model, init, pools=pools)
        return {"precision": option, "alpha": alpha, "pool_depth": depth, "drop_misses": drops, "tau": tau,
                "prefetch": pmax > 0, "prefetch_max": pmax, **r.to_dict()}

    bound = "ppl_high" if loss_model is not None and loss_model.has_interval else None
    goal = Objective(metric, limit, config.tpot_target_ms, most_hits=config.max_error is not None, bound=bound)
    taus = _distinct_taus(subs_map)

    def search(option) -> list[dict]:
        """The substitution rule without prefetch, then prefetch on the best rules."""
        found = [run(0.0, 0, False, TAUS[0], 0, option)]
        for alpha in ALPHAS[1:]:
            for depth in DEPTHS:
                for drops in (False, True):
                    for tau in taus:
                        found.append(run(alpha, depth, drops, tau, 0, option))
        for c in goal.best_n(found, PREFETCH_TRIALS):
            for pmax in PREFETCH_MAX:
                found.append(run(c["alpha"], c["pool_depth"], c["drop_misses"], c["tau"], pmax, option))
        return found

    candidates = search(native)
    best_native, _ = goal.choose(candidates)
    use_precision = (config.precision != "off" and quant is not None and loss_model is not None
                     and native in EXPERT_DTYPES)
    if use_precision:
        bits = {s: d["bits"] for s, d in zip(quant.schemes, profile.header["quant_sensitivity"]["schemes"])}
        tried, curves_seen = [], {}
        for o in options(quant.schemes, bits, len(quant.classes), config.precision):
            if o.native_only:
                continue
            pools = allocate_pools(profile, o, split.cache_bytes, base, base_params, tokens=min(n_search, 1024),
                                   curves_seen=curves_seen)
            if pools is None:
                continue
            layouts[o.name] = (pools, {l: pools.total_slots(l) for l in layers}, pool_initial(profile, pools))
            tried.append(run(0.0, 0, False, TAUS[0], 0, o.name))
            tried.append(run(best_native["alpha"], best_native["pool_depth"], best_native["drop_misses"],
                             best_native["tau"], best_native["prefetch_max"], o.name))
        candidates += tried
        if tried:
            top = goal.choose(tried)[0]["precision"]
            log(f"precision: {len(tried) // 2} options fit the budget; searching the rule for {top} "
                "(high/mid/low importance classes)")
            candidates += search(top)
    best, objective = goal.choose(candidates)
    if config.tpot_target_ms is not None and best["tpot_ms"] > config.tpot_target_ms:
        log(f"warning: no plan meets --tpot-target {config.tpot_target_ms:g} ms on {target.name}; "
            f"the fastest models {best['tpot_ms']:.2f} ms")
    chosen = replace(choice(best["alpha"], best["pool_depth"], best["drop_misses"], best["tau"], best["prefetch_max"]),
                     objective=objective, error_metric=metric, error_limit=limit, error_bound=bound,
                     protect_frac=config.protect_frac,
                     batch=config.batch, context=config.context, precision=best["precision"])
    pools, slots, initial = layouts[best["precision"]]
    n_pred = min(config.predict_tokens, profile.trace["ids"].shape[0])
    predicted = {"tokens": n_pred, "target": target.name,
                 "plan": simulate_plan(profile, slots, chosen, subs_map, costs, n_pred, loss_model, initial,
                                       pools=pools).to_dict()}
    if pools is not None:          # what the best plan held at the native format alone predicts, for comparison
        _, sl, init = layouts[native]
        c = choice(best_native["alpha"], best_native["pool_depth"], best_native["drop_misses"], best_native["tau"],
                   best_native["prefetch_max"])
        predicted["plan_native"] = simulate_plan(profile, sl, c, subs_map, costs, n_pred, loss_model, init).to_dict()
    for name in BASELINES:
        predicted[name] = simulate_baseline(profile, name, split.total_slots, config.window, host, costs, n_pred,
                                            loss_model).to_dict()
    for name in ("lru", "smoe"):
        if predicted[name]["loads_per_token"] > 0:
            predicted["plan"][f"loads_vs_{name}"] = predicted["plan"]["loads_per_token"] / predicted[name]["loads_per_token"]
        if predicted[name]["tpot_ms"] > 0:
            predicted["plan"][f"tpot_vs_{name}"] = predicted["plan"]["tpot_ms"] / predicted[name]["tpot_ms"]

    header = new_header(
        FORMAT, FORMAT_VERSION,
        model={k2: model[k2] for k2 in ("fingerprint", "model_type", "num_experts", "top_k", "moe_layers",
                                         "expert_bytes", "dense_bytes", "checkpoint_dtype")},
        profile={"path": str(Path(profile_dir).resolve()), "sha256": sha256_dir(profile_dir),
                 "calibration": [c.get("tokens_sha256") for c in profile.header["calibration"]]},
        budget=split.to_dict() | {"text": config.budget} | ({"auto": auto.to_dict()} if auto else {}),
        target=target.to_dict(),
        choices=chosen.to_dict(),
        predicted=predicted,
        search=candidates,
        curves={str(l): c for l, c in curves.items()},
    )
    precision = None
    if pools is not None:
        schemes = {s["name"]: s for s in profile.header["quant_sensitivity"]["schemes"]}
        precision = {"native": native, "schemes": {n: schemes[n] for n in pools.names[1:]},
                     "layers": {l: {"experts": list(pools.names[p] for p in pools.of[l]),
                                    "slots": {pools.names[p]: n for p, n in enumerate(pools.slots[l]) if n}}
                                for l in layers}}
    return Plan(header=header, slots=slots, expert_bytes=split.expert_bytes, precision=precision,
                substitutes={l: subs_map[l]["substitutes"] for l in layers},
                protected={l: subs_map[l]["protected"] for l in layers},
                drop_ok={l: subs_map[l]["drop_ok"] for l in layers}, initial=initial,
                clusters={l: subs_map[l]["clusters"] for l in layers},
                cluster_table={l: subs_map[l]["cluster_table"] for l in layers},
                not_taken={l: subs_map[l]["not_taken"] for l in layers})
