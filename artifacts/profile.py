"""The profile artifact: how a model's experts behave on calibration text.

Directory layout (format "understudy.profile", version 4):
  profile.json        header: format, version, provenance (model fingerprint, calibration), settings
  stats.safetensors   per MoE layer l, tensors named "L{l}.{stat}" (sums and counts, so profiles merge by addition)
  trace.safetensors   the routing trace of the calibration tokens, for the compiler's simulator

Statistics stored (E = experts; all sums float64, counts int64), each read by the compiler or the summary:
  tokens [1]              tokens that reached the layer
  act_count [E]           tokens routed to e                                        (frequency: initial residents)
  importance_sum [E]      sum over tokens routed to e of g_e(x) * ||f_e(x)||         (importance: protected experts)
  probe_count [1]         probe tokens on which every expert was run
  cos_sum [E, E]          sum over probe tokens of cos(f_i(x), f_j(x))                (similarity: clusters)
  err_sum [E, E]          sum over probe tokens of ||f_i(x) - f_j(x)|| / ||f_i(x)||   (near-twin understudies)
  clusters [E]            functional groups (agglomerative, on the mean cosine; recomputed on merge)
  sensitivity.*           the measured loss cost of substitutions (profiler.sensitivity; header "sensitivity")
  quant_class [E], quant_dnll_sum [C, S], quant_kl_sum [C, S], quant_pairs [C, S], quant_weight_error [E, S], quant.*
                          the measured loss cost of quantizing experts by importance class C and scheme S
                          (profiler.quant_sensitivity; header "quant_sensitivity"; version 3, optional)
  sensitivity.dnll_window [N, O, C], sensitivity.pair_window [N, O, C], quant_kl_window [N, C, S],
  quant_pairs_window [N, C, S]
                          the same measurements per calibration window n (version 4, optional; their sums over n
                          are the sums above): the compiler's interval of a plan's predicted loss
Trace tensors: ids [T, M, W] int32 (the k chosen experts by descending score, then the next W-k by score),
scores [T, M, W] float32, coef [T, M] float32 (weight per unit of gate), pred_ids / pred_scores [T, M, W] (the same
view of the next MoE layer's router applied to this layer's input: what the runtime prefetches by; -1 / 0 for the
last MoE layer), token [T] int32, sample [T] int32;
M = number of MoE layers, in `moe_layers` order.

Compatibility: readers accept versions 1..FORMAT_VERSION; new versions add fields, never reinterpret old ones.
Version 2 stopped computing statistics nothing read (version 1 also held score_sum, score_sqsum, active_score_sum,
ratio_hist, coact, transition and out_norm_sum, and a "ratio_bins" header); a version-1 profile still loads, its
extra tensors are ignored. Version 3 added the quantization sensitivity; a profile without it (any version, or
--quant-tokens 0) has `quant_sensitivity` None. Version 4 added the per-window measurements; a profile without them
gets predictions without an interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts.atomic import atomic_dir
from artifacts.checks import Checker
from artifacts.errors import UserError
from artifacts.header import read_header, write_json

FORMAT = "understudy.profile"
FORMAT_VERSION = 4
HEADER_FILE, STATS_FILE, TRACE_FILE = "profile.json", "stats.safetensors", "trace.safetensors"

LAYER_STATS = ("tokens", "act_count", "importance_sum", "probe_count", "cos_sum", "err_sum", "clusters")
QUANT_LAYER_STATS = ("quant_class", "quant_dnll_sum", "quant_kl_sum", "quant_pairs", "quant_weight_error",
                     "quant_kl_window", "quant_pairs_window")
TRACE_KEYS = ("ids", "scores", "coef", "pred_ids", "pred_scores", "token", "sample")


def _safe(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    return x / np.maximum(d, 1)


@dataclass(frozen=True)
class QuantSensitivity:
    """What quantizing experts costs (profiler.quant_sensitivity): S schemes, C importance classes, per MoE layer."""

    schemes: tuple[str, ...]
    expert_bytes: tuple[int, ...]           # one expert quantized by each scheme, bytes
    classes: tuple[str, ...]
    tokens: int                             # calibration tokens of the passes
    predicted: int                          # predicted tokens (dnll's denominator)
    positions: int                          # token positions (pairs' denominator)
    expert_class: dict[int, np.ndarray]     # layer -> [E] class index
    dnll_sum: dict[int, np.ndarray]         # layer -> [C, S] NLL increase, nats summed over predicted tokens
    kl_sum: dict[int, np.ndarray]           # layer -> [C, S] KL(exact || quantized), nats summed over them
    pairs: dict[int, np.ndarray]            # layer -> [C, S] routed pairs the quantized experts served
    weight_error: dict[int, np.ndarray]     # layer -> [E, S] ||W - W'||_F / ||W||_F
    kl_window: dict[int, np.ndarray] | None = None      # layer -> [N, C, S] kl_sum per calibration window
    pairs_window: dict[int, np.ndarray] | None = None   # layer -> [N, C, S] pairs per calibration window


@dataclass
class Profile:
    header: dict
    stats: dict[str, np.ndarray]                      # "L{l}.{stat}" -> array
    trace: dict[str, np.ndarray] = field(default_factory=dict)

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return list(self.header["model"]["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.header["model"]["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.header["model"]["top_k"])

    @property
    def fingerprint(self) -> str:
        return self.header["model"]["fingerprint"]

    def stat(self, layer: int, name: str) -> np.ndarray:
        return self.stats[f"L{layer}.{name}"]

    def _per_layer(self, fn) -> dict[int, np.ndarray]:
        return {l: fn(l) for l in self.moe_layers}

    # ---- derived statistics, per layer index ----------------------------------------------------------------
    @property
    def frequency(self) -> dict[int, np.ndarray]:
        """[E] share of tokens routed to each expert: act_count / tokens."""
        return self._per_layer(lambda l: self.stat(l, "act_count") / max(int(self.stat(l, "tokens")[0]), 1))

    @property
    def importance(self) -> dict[int, np.ndarray]:
        """[E] I_e = mean over tokens routed to e of g_e(x) * ||f_e(x)|| (0 for an expert never routed)."""
        return self._per_layer(lambda l: _safe(self.stat(l, "importance_sum"), self.stat(l, "act_count")))

    @property
    def importance_share(self) -> dict[int, np.ndarray]:
        """[E] e's share of the layer's routed output norm: sum g_e||f_e|| / sum over all experts."""
        return self._per_layer(lambda l: self.stat(l, "importance_sum")
                               / max(float(self.stat(l, "importance_sum").sum()), 1e-30))

    @property
    def similarity(self) -> dict[int, np.ndarray]:
        """[E, E] mean over probe tokens of cos(f_i(x), f_j(x))."""
        return self._per_layer(lambda l: self.stat(l, "cos_sum") / max(int(self.stat(l, "probe_count")[0]), 1))

    @property
    def substitution_error(self) -> dict[int, np.ndarray]:
        """[E, E] mean over probe tokens of ||f_i(x) - f_j(x)|| / ||f_i(x)||: the cost of j standing in for i."""
        return self._per_layer(lambda l: self.stat(l, "err_sum") / max(int(self.stat(l, "probe_count")[0]), 1))

    @property
    def clusters(self) -> dict[int, np.ndarray]:
        return self._per_layer(lambda l: self.stat(l, "clusters"))

    @property
    def sensitivity(self) -> dict[str, np.ndarray] | None:
        """The loss cost of substitution options (profiler.sensitivity), or None when not measured."""
        if not self.header.get("sensitivity"):
            return None
        return {k.removeprefix("sensitivity."): v for k, v in self.stats.items() if k.startswith("sensitivity.")}

    @property
    def quant_sensitivity(self) -> QuantSensitivity | None:
        """The loss cost of quantizing experts, or None when not measured (older profiles, --quant-tokens 0)."""
        h = self.header.get("quant_sensitivity")
        if not h:
            return None

        def per(name: str) -> dict[int, np.ndarray] | None:
            if f"L{self.moe_layers[0]}.{name}" not in self.stats:           # a version-4 field, absent before
                return None
            return self._per_layer(lambda l: self.stat(l, name))

        return QuantSensitivity(
            schemes=tuple(s["name"] for s in h["schemes"]), expert_bytes=tuple(s["expert_bytes"] for s in h["schemes"]),
            classes=tuple(h["classes"]), tokens=int(h["tokens"]), predicted=int(self.stats["quant.predicted"][0]),
            positions=int(self.stats["quant.positions"][0]), expert_class=per("quant_class"),
            dnll_sum=per("quant_dnll_sum"), kl_sum=per("quant_kl_sum"), pairs=per("quant_pairs"),
            weight_error=per("quant_weight_error"), kl_window=per("quant_kl_window"),
            pairs_window=per("quant_pairs_window"))

    # ---- I/O ------------------------------------------------------------------------------------------------
    def validate(self, where: str = "profile") -> None:
        """Every header field the tools read, every tensor's shape, finite values, expert ids in range."""
        c = Checker(where, "re-run moe-profile (profiles are not meant to be edited by hand)")
        h = self.header
        model, layers, e = c.model_section(h)
        for key in ("expert_bytes", "routed_expert_bytes"):
            c.int_(c.get(model, key, f"model.{key}"), f"model.{key}", 1)
        for key in ("dense_bytes", "kv_bytes_per_token"):
            if key in model:
                c.int_(model[key], f"model.{key}", 0)
        trace_h = c.obj(c.get(h, "trace", "trace"), "trace")
        width = c.int_(c.get(trace_h, "width", "trace.width"), "trace.width", 1, e)
        c.num(c.get(c.obj(c.get(h, "clustering", "clustering"), "clustering"), "threshold", "clustering.threshold"),
              "clustering.threshold", 0.0)
        calib = c.lst(c.get(h, "calibration", "calibration"), "calibration")
        for n, rec in enumerate(calib):
            c.obj(rec, f"calibration[{n}]")
        shapes = {"tokens": (1,), "act_count": (e,), "importance_sum": (e,), "probe_count": (1,),
                  "cos_sum": (e, e), "err_sum": (e, e), "clusters": (e,)}
        for l in layers:
            for name, shape in shapes.items():
                self._check_tensor(c, self.stats, f"L{l}.{name}", shape)
        sens = h.get("sensitivity")
        if sens:
            sens = c.obj(sens, "sensitivity")
            shape = (len(c.lst(c.get(sens, "options", "sensitivity.options"), "sensitivity.options")),
                     len(c.lst(c.get(sens, "cuts", "sensitivity.cuts"), "sensitivity.cuts")))
            for n, x in enumerate(sens["cuts"]):
                c.num(x, f"sensitivity.cuts[{n}]", 0.0)
            c.int_(c.get(sens, "tokens", "sensitivity.tokens"), "sensitivity.tokens", 1)
            for name, want in (("dnll_sum", shape), ("pair_count", shape), ("nll_sum", (1,)), ("predicted", (1,)),
                               ("positions", (1,))):
                self._check_tensor(c, self.stats, f"sensitivity.{name}", want)
            self._check_windows(c, ("sensitivity.dnll_window", "sensitivity.pair_window"), shape)
        if h.get("quant_sensitivity"):
            self._check_quant(c, h["quant_sensitivity"], layers, e)
        if self.trace:
            missing = [k for k in TRACE_KEYS if k not in self.trace]
            if missing:
                c.fail(f"trace tensor {missing[0]}", "is missing")
            t = int(self.trace["token"].shape[0]) if self.trace["token"].ndim == 1 else -1
            m = len(layers)
            for key, shape in (("ids", (t, m, width)), ("scores", (t, m, width)), ("coef", (t, m)),
                               ("pred_ids", (t, m, width)), ("pred_scores", (t, m, width)), ("token", (t,)),
                               ("sample", (t,))):
                self._check_tensor(c, self.trace, key, shape, what="trace tensor")
            for key, lo in (("ids", 0), ("pred_ids", -1)):
                a = self.trace[key]
                if a.size and (int(a.min()) < lo or int(a.max()) >= e):
                    c.fail(f"trace tensor {key}", f"holds expert ids outside {lo}..{e - 1}")

    def _check_quant(self, c: Checker, q, layers: list[int], e: int) -> None:
        """The header's quant_sensitivity section and its tensors (format version 3)."""
        q = c.obj(q, "quant_sensitivity")
        schemes = c.lst(c.get(q, "schemes", "quant_sensitivity.schemes"), "quant_sensitivity.schemes")
        for n, s in enumerate(schemes):
            where = f"quant_sensitivity.schemes[{n}]"
            c.obj(s, where)
            if not isinstance(c.get(s, "name", f"{where}.name"), str):
                c.fail(f"{where}.name", "is not a string")
            c.choice(c.get(s, "bits", f"{where}.bits"), f"{where}.bits", (4, 8))
            c.int_(c.get(s, "expert_bytes", f"{where}.expert_bytes"), f"{where}.expert_bytes", 1)
        classes = c.lst(c.get(q, "classes", "quant_sensitivity.classes"), "quant_sensitivity.classes")
        if not schemes or not classes:
            c.fail("quant_sensitivity", "has no schemes or no classes")
        c.int_(c.get(q, "tokens", "quant_sensitivity.tokens"), "quant_sensitivity.tokens", 1)
        n_c, n_s = len(classes), len(schemes)
        for l in layers:
            for name, shape in (("quant_class", (e,)), ("quant_dnll_sum", (n_c, n_s)), ("quant_kl_sum", (n_c, n_s)),
                                ("quant_pairs", (n_c, n_s)), ("quant_weight_error", (e, n_s))):
                self._check_tensor(c, self.stats, f"L{l}.{name}", shape)
            cls = self.stats[f"L{l}.quant_class"]
            if cls.size and (int(cls.min()) < 0 or int(cls.max()) >= n_c):
                c.fail(f"tensor L{l}.quant_class", f"holds classes outside 0..{n_c - 1}")
        for name in ("predicted", "positions"):
            self._check_tensor(c, self.stats, f"quant.{name}", (1,))
        # every layer's or none (the loss model resamples the same windows in every layer)
        self._check_windows(c, tuple(f"L{l}.quant_{name}_window" for l in layers for name in ("kl", "pairs")),
                            (n_c, n_s))

    def _check_windows(self, c: Checker, keys: tuple[str, ...], shape: tuple) -> None:
        """Per-window tensors (version 4): absent together, or all [N, *shape] with the same N >= 1."""
        present = [k for k in keys if k in self.stats]
        if not present:
            return
        if len(present) < len(keys):
            c.fail(f"tensor {sorted(set(keys) - set(present))[0]}", "is missing")
        n = self.stats[keys[0]].shape[0] if self.stats[keys[0]].ndim == len(shape) + 1 else -1
        for k in keys:
            self._check_tensor(c, self.stats, k, (max(n, 1), *shape))

    @staticmethod
    def _check_tensor(c: Checker, tensors: dict, key: str, shape: tuple, what: str = "tensor") -> None:
        a = tensors.get(key)
        if a is None:
            c.fail(f"{what} {key}", "is missing")
        if tuple(a.shape) != tuple(shape):
            c.fail(f"{what} {key}", f"has shape {tuple(a.shape)}, expected {tuple(shape)}")
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            c.fail(f"{what} {key}", "holds NaN or infinite values")

    def save(self, path: str | Path, extras=None) -> Path:
        """Write the profile directory atomically (`extras(tmp_dir)` may add files to the same swap)."""
        from safetensors.numpy import save_file

        self.validate()
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.stats.items()}, str(tmp / STATS_FILE))
            save_file({k: np.ascontiguousarray(v) for k, v in self.trace.items()}, str(tmp / TRACE_FILE))
            write_json(tmp / HEADER_FILE, self.header)
            if extras is not None:
                extras(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, with_trace: bool = True) -> "Profile":
        from safetensors.numpy import load_file

        path = Path(path)
        header = read_header(path / HEADER_FILE, FORMAT, FORMAT_VERSION, "profile")
        try:
            stats = load_file(str(path / STATS_FILE))
            trace = load_file(str(path / TRACE_FILE)) if with_trace else {}
        except FileNotFoundError as exc:
            raise UserError(f"profile {path} is incomplete: {Path(exc.filename or '').name} is missing; "
                            "re-run moe-profile") from None
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            raise UserError(f"profile {path} is corrupt ({str(exc).splitlines()[0]}); re-run moe-profile") from None
        profile = cls(header=header, stats=stats, trace=trace)
        profile.validate(f"profile {path}")
        return profile
