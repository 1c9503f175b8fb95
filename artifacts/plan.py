"""The plan artifact: what `moe-compile` decided for one model, budget and target; what the runtime executes.

Directory layout (format "understudy.plan", version 2):
  plan.json               header: format, version, provenance (profile hash, model fingerprint, budget, target),
                          the choices (alpha, tau, eviction window, prefetch, host split) and predicted metrics
  cache_plan.json         {"expert_bytes": int, "slots": {layer: n}, "initial": {layer: [expert ids]},
                           "precision": optional (version 2), a precision plan: {"native": the checkpoint's format,
                             "schemes": {name: {"bits", "group", "scale_dtype", "expert_bytes"}},
                             "layers": {layer: {"experts": [precision name of every expert],
                                                "slots": {precision name: slots}}}}}
                          (without "precision" every slot holds one expert at the checkpoint's format; with it,
                          slots[layer] = the sum of the layer's precision slots, a slot of precision p holds
                          expert_bytes(p), and the runtime makes the quantized copies at load, runtime.quantize)
  substitution_map.json   {"tau": float, "layers": {layer: {"protected": [ids], "drop_ok": [ids],
                           "clusters": [labels], "substitutes": {expert: [[j, similarity, error], ...]},
                           "cluster_table": [{"id", "members", "mean_error", "max_error"}, ...],
                           "not_taken": {expert: [[j, error, reason], ...]}}}}
                          (substitutes: the near-twin candidates, same cluster only; not_taken: why the nearest
                          others are not; drop_ok is used only where choices.drop_misses)
Compatibility: readers accept versions 1..FORMAT_VERSION; new versions add fields, never reinterpret old ones
(version 2 added "precision"; a version-1 reader refuses a version-2 plan rather than misread its slots).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.atomic import atomic_dir
from artifacts.checks import Checker, load_json
from artifacts.errors import UserError
from artifacts.header import read_header, write_json

FORMAT = "understudy.plan"
FORMAT_VERSION = 2
HEADER_FILE, CACHE_FILE, SUBS_FILE = "plan.json", "cache_plan.json", "substitution_map.json"
EXPERT_DTYPES = ("float32", "bfloat16", "float16")
# what model.checkpoint_dtype may name: a dtype, or a quantized checkpoint's packed expert format (runtime/formats.py)
EXPERT_FORMAT = re.compile("|".join(EXPERT_DTYPES) + r"|mxfp4|fp8_e4m3_b[1-9][0-9]*x[1-9][0-9]*")


@dataclass(frozen=True)
class PlanChoices:
    """What moe-compile chose (plan.json "choices"): the substitution rule, the cache's behaviour, and how it was
    chosen. `runtime.policy.plan_policy` turns it into the runtime's policy, for the runtime, the compiler's search
    and simulator, and the report alike.

    A routed pair (token, i) with score s_i is replaceable when i is not protected and s_i <= (1 + alpha) S(k+1)
    (S(k+1) = the best unchosen score); it is then served by a near-twin j with profiled error err(i, j) <= tau, or
    by one of the token's `pool_depth` best unchosen experts that is cached, or dropped (`drop_misses`, where the
    substitution map allows it), or loaded.
    """

    alpha: float                       # score band (0: lossless)
    tau: float                         # near-twin threshold on the profiled relative output error
    pool_depth: int | None             # band understudies among the token's d best inactive experts (None: any)
    drop_misses: bool                  # low-score misses without an understudy are dropped (else loaded)
    prefetch: bool                     # next-layer prefetch
    prefetch_max: int | None           # prefetches per layer call (None: k)
    window: int                        # score-eviction window, decode steps
    host_compute: bool                 # compute low-score misses on the host where cheaper than loading
    width: int | None = None           # experts per token the runtime ranks (trace width)
    eviction: str = "score"
    understudy_weight: str = "auto"
    objective: str = ""                # how the candidate was chosen, in words
    error_metric: str = "ppl_increase"
    error_limit: float | None = None
    error_bound: str | None = None     # the figure error_limit applies to: None, error_metric's value; "ppl_high",
                                       # the upper end of its predicted 95% interval
    protect_frac: float = 0.1
    batch: int = 1
    context: int = 2048
    precision: str | None = None       # the precision option: the native format's name, or one precision per
                                       # importance class "high/mid/low" (compiler.precision); cache_plan.json
                                       # "precision" holds what it means per expert

    @classmethod
    def from_dict(cls, d: dict) -> "PlanChoices":
        """From plan.json (fields this version does not know are ignored; missing ones take their defaults)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Plan:
    header: dict
    slots: dict[int, int]                                   # MoE layer -> cache slots
    expert_bytes: int                                       # bytes of one routed expert (the run's dtype)
    substitutes: dict[int, dict[int, list[tuple[int, float, float]]]]  # layer -> i -> [(j, similarity, error)]
    protected: dict[int, list[int]] = field(default_factory=dict)      # never substituted
    drop_ok: dict[int, list[int]] = field(default_factory=dict)        # low-score misses that may be dropped
    initial: dict[int, list[int]] = field(default_factory=dict)        # experts loaded before the first token
    clusters: dict[int, list[int]] = field(default_factory=dict)
    cluster_table: dict[int, list[dict]] = field(default_factory=dict)              # per cluster: members, errors
    not_taken: dict[int, dict[int, list[tuple[int, float, str]]]] = field(default_factory=dict)  # why not a twin
    precision: dict | None = None            # cache_plan.json "precision" (module docstring); None: native only

    def precision_bytes(self) -> dict[str, int]:
        """Bytes of one expert per precision name (the native format's is expert_bytes)."""
        if self.precision is None:
            return {self.expert_dtype: self.expert_bytes}
        return _precision_bytes(self.precision, self.expert_bytes)

    @property
    def held_bytes(self) -> int:
        """Bytes of every cache slot of the plan: sum over layers and precisions of slots x bytes per expert."""
        if self.precision is None:
            return sum(self.slots.values()) * self.expert_bytes
        return _held_bytes(self.precision, self.expert_bytes)

    @property
    def choices(self) -> PlanChoices:
        return PlanChoices.from_dict(self.header["choices"])

    @property
    def alpha(self) -> float:
        return self.choices.alpha

    @property
    def tau(self) -> float:
        return self.choices.tau

    @property
    def budget(self) -> dict:
        return self.header["budget"]

    @property
    def predicted(self) -> dict:
        return self.header.get("predicted", {})

    @property
    def fingerprint(self) -> str:
        return self.header["model"]["fingerprint"]

    def substitution_map(self) -> dict[int, dict]:
        """Per layer {"substitutes", "protected", "drop_ok"}: what runtime.policy.plan_params reads."""
        return {l: {"substitutes": self.substitutes.get(l, {}), "protected": self.protected.get(l, []),
                    "drop_ok": self.drop_ok.get(l, [])} for l in self.slots}

    def _files(self) -> tuple[dict, dict]:
        cache = {"expert_bytes": self.expert_bytes, "slots": {str(l): n for l, n in self.slots.items()},
                 "initial": {str(l): v for l, v in self.initial.items()}}
        if self.precision is not None:
            cache["precision"] = self.precision
        subs = {"tau": self.tau, "layers": {str(l): {
            "protected": self.protected.get(l, []), "drop_ok": self.drop_ok.get(l, []),
            "clusters": self.clusters.get(l, []),
            "cluster_table": self.cluster_table.get(l, []),
            "not_taken": {str(i): [list(t) for t in v] for i, v in self.not_taken.get(l, {}).items()},
            "substitutes": {str(i): [list(t) for t in v] for i, v in self.substitutes.get(l, {}).items()}}
            for l in self.slots}}
        return cache, subs

    def _check(self, where: Path | str, cache: dict, subs: dict) -> None:
        try:
            as_read = json.loads(json.dumps([self.header, cache, subs], allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise UserError(f"plan {where} holds a value JSON cannot store ({exc}); re-run moe-compile") from None
        Plan._from_json(Path(where), *as_read)

    def validate(self, where: str = "(in memory)") -> "Plan":
        """The checks `Plan.load` makes, for a plan built in memory; returns self."""
        self._check(where, *self._files())
        return self

    def save(self, path: str | Path, extras=None) -> Path:
        """Write the plan directory atomically; `extras(tmp_dir)` adds files (report.md, plots) to the same swap."""
        path = Path(path)
        cache, subs = self._files()
        self._check(path, cache, subs)           # never write a plan that would not load
        with atomic_dir(path) as tmp:
            write_json(tmp / CACHE_FILE, cache)
            write_json(tmp / SUBS_FILE, subs)
            write_json(tmp / HEADER_FILE, self.header)
            if extras is not None:
                extras(tmp)
        return path

    @property
    def cache_budget_bytes(self) -> int:
        """Bytes the expert cache may hold: the budget's cache share (all slots x expert bytes fit in it)."""
        return int(self.header["budget"]["cache_bytes"])

    @property
    def expert_dtype(self) -> str:
        """dtype (or packed format) the plan's expert bytes are counted in (the checkpoint's): what the cache holds
        at run time."""
        return str(self.header["model"].get("checkpoint_dtype", "bfloat16"))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read and validate a plan directory: every field against the schema and the plan's own model section
        (layers, expert ids, slot counts <= experts, finite numbers in range, slots x bytes within the budget)."""
        path = Path(path)
        remedy = "re-run moe-compile"
        header = read_header(path / HEADER_FILE, FORMAT, FORMAT_VERSION, "plan")
        cache = load_json(path / CACHE_FILE, "plan", remedy)
        subs = load_json(path / SUBS_FILE, "plan", remedy)
        return cls._from_json(path, header, cache, subs)

    @classmethod
    def _from_json(cls, path: Path, header: dict, cache: dict, subs: dict) -> "Plan":
        remedy = "re-run moe-compile (plans are not meant to be edited by hand)"
        h = Checker(f"plan {path / HEADER_FILE}", remedy)
        model, layers, e = h.model_section(header)
        if "checkpoint_dtype" in model and not (isinstance(model["checkpoint_dtype"], str)
                                                and EXPERT_FORMAT.fullmatch(model["checkpoint_dtype"])):
            h.fail("model.checkpoint_dtype", f"is {model['checkpoint_dtype']!r}; expected one of "
                   f"{', '.join(EXPERT_DTYPES)}, mxfp4, fp8_e4m3_bRxC")
        budget = h.obj(h.get(header, "budget", "budget"), "budget")
        cache_budget = h.int_(h.get(budget, "cache_bytes", "budget.cache_bytes"), "budget.cache_bytes", 1)
        if "auto" in budget:        # optional (added later): how `--budget auto` derived the budget
            auto = h.obj(budget["auto"], "budget.auto")
            for key in ("free_bytes", "headroom_bytes", "budget_bytes"):
                h.int_(h.get(auto, key, f"budget.auto.{key}"), f"budget.auto.{key}", 0)
        c = h.obj(h.get(header, "choices", "choices"), "choices")
        for key in ("alpha", "tau", "pool_depth", "drop_misses", "prefetch", "prefetch_max", "window", "host_compute"):
            h.get(c, key, f"choices.{key}")
        h.num(c["alpha"], "choices.alpha", 0.0)
        h.num(c["tau"], "choices.tau", 0.0)
        for key, lo, hi in (("window", 1, None), ("width", 1, e), ("pool_depth", 0, e), ("prefetch_max", 1, e),
                            ("batch", 1, None), ("context", 1, None)):
            if c.get(key) is not None:
                h.int_(c[key], f"choices.{key}", lo, hi)
        for key in ("prefetch", "host_compute", "drop_misses"):
            if key in c:
                h.bool_(c[key], f"choices.{key}")
        if "eviction" in c:
            h.choice(c["eviction"], "choices.eviction", ("lru", "score"))
        if "understudy_weight" in c:
            h.choice(c["understudy_weight"], "choices.understudy_weight", ("own", "replaced", "auto"))
        _finite_tree(h, header.get("predicted", {}), "predicted")

        k = Checker(f"plan {path / CACHE_FILE}", remedy)
        k.obj(cache, "the file")
        expert_bytes = k.int_(k.get(cache, "expert_bytes", "expert_bytes"), "expert_bytes", 1)
        if "expert_bytes" in model and expert_bytes != model["expert_bytes"]:
            k.fail("expert_bytes", f"is {expert_bytes}, but plan.json's model has {model['expert_bytes']}")
        slot_map = k.obj(k.get(cache, "slots", "slots"), "slots")
        slots = {k.key_int(l, "slots", layers): k.int_(n, f"slots[{l}]", 1, e) for l, n in slot_map.items()}
        if set(slots) != set(layers):
            k.fail("slots", f"covers layers {sorted(slots)}, the model's MoE layers are {layers}")
        precision = None
        if "precision" in cache:
            precision = _check_precision(k, cache["precision"], model, expert_bytes, slots, e)
            held = _held_bytes(precision, expert_bytes)
            if held > cache_budget:
                k.fail("precision", f"slots hold {held} B, more than the budget's {cache_budget} B of cache")
        elif sum(slots.values()) * expert_bytes > cache_budget:
            k.fail("slots", f"hold {sum(slots.values())} x {expert_bytes} B, more than the budget's "
                            f"{cache_budget} B of cache")
        initial = {}
        for l, v in k.obj(cache.get("initial", {}), "initial").items():
            li = k.key_int(l, "initial", layers)
            initial[li] = k.ids(v, f"initial[{l}]", e)
            if len(initial[li]) > slots[li]:
                k.fail(f"initial[{l}]", f"lists {len(initial[li])} experts for {slots[li]} slots")

        s = Checker(f"plan {path / SUBS_FILE}", remedy)
        s.obj(subs, "the file")
        if "tau" in subs:
            s.num(subs["tau"], "tau", 0.0)
        substitutes, protected, drop_ok, clusters, table, not_taken = {}, {}, {}, {}, {}, {}
        for l, d in s.obj(s.get(subs, "layers", "layers"), "layers").items():
            li = s.key_int(l, "layers", layers)
            d = s.obj(d, f"layers[{l}]")
            protected[li] = s.ids(d.get("protected", []), f"layers[{l}].protected", e)
            drop_ok[li] = s.ids(d.get("drop_ok", []), f"layers[{l}].drop_ok", e)
            clusters[li] = [s.int_(x, f"layers[{l}].clusters[{n}]", 0)
                            for n, x in enumerate(s.lst(d.get("clusters", []), f"layers[{l}].clusters"))]
            if clusters[li] and len(clusters[li]) != e:
                s.fail(f"layers[{l}].clusters", f"has {len(clusters[li])} labels for {e} experts")
            rows_by_i = {}
            for i, ranked in s.obj(d.get("substitutes", {}), f"layers[{l}].substitutes").items():
                ii = s.key_int(i, f"layers[{l}].substitutes", range(e))
                rows = []
                for n, row in enumerate(s.lst(ranked, f"layers[{l}].substitutes[{i}]")):
                    f = f"layers[{l}].substitutes[{i}][{n}]"
                    if not isinstance(row, list) or len(row) != 3:
                        s.fail(f, "is not [expert, similarity, error]")
                    j = s.int_(row[0], f + "[0]", 0, e - 1)
                    if j == ii:
                        s.fail(f + "[0]", "is the replaced expert itself")
                    rows.append((j, s.num(row[1], f + "[1]"), s.num(row[2], f + "[2]", 0.0)))
                rows_by_i[ii] = rows
            substitutes[li] = rows_by_i
            table[li] = s.lst(d.get("cluster_table", []), f"layers[{l}].cluster_table")
            for n, c in enumerate(table[li]):
                s.ids(s.get(c, "members", f"layers[{l}].cluster_table[{n}].members"),
                      f"layers[{l}].cluster_table[{n}].members", e)
            not_taken[li] = {s.key_int(i, f"layers[{l}].not_taken", range(e)):
                             [(s.int_(r[0], f"layers[{l}].not_taken[{i}]", 0, e - 1), r[1], str(r[2]))
                              for r in s.lst(v, f"layers[{l}].not_taken[{i}]")]
                             for i, v in s.obj(d.get("not_taken", {}), f"layers[{l}].not_taken").items()}
        return cls(header=header, slots=slots, expert_bytes=expert_bytes, substitutes=substitutes,
                   protected=protected, drop_ok=drop_ok, initial=initial, clusters=clusters, cluster_table=table,
                   not_taken=not_taken, precision=precision)


def _precision_bytes(precision: dict, expert_bytes: int) -> dict[str, int]:
    return {precision["native"]: expert_bytes, **{n: int(d["expert_bytes"]) for n, d in precision["schemes"].items()}}


def _held_bytes(precision: dict, expert_bytes: int) -> int:
    """sum over layers and precisions p of slots(l, p) x bytes(p)."""
    b = _precision_bytes(precision, expert_bytes)
    return sum(n * b[p] for d in precision["layers"].values() for p, n in d["slots"].items())


def _check_precision(k: Checker, p, model: dict, expert_bytes: int, slots: dict[int, int], e: int) -> dict:
    """cache_plan.json "precision" (format version 2) against the plan's model and slots; returned with int layer
    keys."""
    p = k.obj(p, "precision")
    native = k.get(p, "native", "precision.native")
    if native != model.get("checkpoint_dtype", "bfloat16") or native not in EXPERT_DTYPES:
        k.fail("precision.native", f"is {native!r}; a precision plan quantizes a float checkpoint's experts "
               f"({model.get('checkpoint_dtype', 'bfloat16')} here)")
    schemes = {}
    for name, d in k.obj(k.get(p, "schemes", "precision.schemes"), "precision.schemes").items():
        f = f"precision.schemes[{name}]"
        d = k.obj(d, f)
        if name == native:
            k.fail(f, "names the native format")
        k.choice(k.get(d, "bits", f + ".bits"), f + ".bits", (4, 8))
        if d.get("group") is not None:
            k.int_(d["group"], f + ".group", 1)
        k.choice(k.get(d, "scale_dtype", f + ".scale_dtype"), f + ".scale_dtype", ("float16", "bfloat16", "float32"))
        k.int_(k.get(d, "expert_bytes", f + ".expert_bytes"), f + ".expert_bytes", 1, expert_bytes)
        schemes[name] = d
    names = (native, *schemes)
    layers = {}
    for l, d in k.obj(k.get(p, "layers", "precision.layers"), "precision.layers").items():
        li = k.key_int(l, "precision.layers", list(slots))
        f = f"precision.layers[{l}]"
        d = k.obj(d, f)
        experts = k.lst(k.get(d, "experts", f + ".experts"), f + ".experts")
        if len(experts) != e or any(x not in names for x in experts):
            k.fail(f + ".experts", f"must name one of {', '.join(names)} for each of the {e} experts")
        pool = {}
        for name, n in k.obj(k.get(d, "slots", f + ".slots"), f + ".slots").items():
            if name not in names:
                k.fail(f + ".slots", f"names {name!r}, not one of {', '.join(names)}")
            pool[name] = k.int_(n, f"{f}.slots[{name}]", 0, experts.count(name))
        for name in set(experts):
            if pool.get(name, 0) < 1:
                k.fail(f + ".slots", f"gives {name} no slot, but experts are held at {name}")
        if sum(pool.values()) != slots[li]:
            k.fail(f + ".slots", f"add up to {sum(pool.values())}, slots[{l}] is {slots[li]}")
        layers[li] = {"experts": list(experts), "slots": pool}
    if set(layers) != set(slots):
        k.fail("precision.layers", f"covers layers {sorted(layers)}, the model's MoE layers are {sorted(slots)}")
    return {"native": native, "schemes": schemes, "layers": layers}


def _finite_tree(check: Checker, v, field: str) -> None:
    """Every number under `v` is finite (predictions are read by reports and the runtime's --stats)."""
    if isinstance(v, dict):
        for key, x in v.items():
            _finite_tree(check, x, f"{field}.{key}")
    elif isinstance(v, list):
        for n, x in enumerate(v):
            _finite_tree(check, x, f"{field}[{n}]")
    elif isinstance(v, float) and not math.isfinite(v):
        check.fail(field, "is not a finite number")
