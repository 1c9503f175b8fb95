"""The plan artifact: what `moe-compile` decided for one model, budget and target; what the runtime executes.

Directory layout (format "understudy.plan", version 1):
  plan.json               header: format, version, provenance (profile hash, model fingerprint, budget, target),
                          the choices (alpha, tau, eviction window, prefetch, host split) and predicted metrics
  cache_plan.json         {"expert_bytes": int, "slots": {layer: n}, "initial": {layer: [expert ids]}}
  substitution_map.json   {"tau": float, "layers": {layer: {"protected": [ids], "drop_ok": [ids],
                           "clusters": [labels], "substitutes": {expert: [[j, similarity, error], ...]}}}}
Compatibility: readers accept versions 1..FORMAT_VERSION; new versions add fields, never reinterpret old ones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.atomic import atomic_dir
from artifacts.errors import UserError
from artifacts.header import read_header, write_json

FORMAT = "understudy.plan"
FORMAT_VERSION = 1
HEADER_FILE, CACHE_FILE, SUBS_FILE = "plan.json", "cache_plan.json", "substitution_map.json"


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

    @property
    def alpha(self) -> float:
        return float(self.header["choices"]["alpha"])

    @property
    def tau(self) -> float:
        return float(self.header["choices"]["tau"])

    @property
    def budget(self) -> dict:
        return self.header["budget"]

    @property
    def predicted(self) -> dict:
        return self.header.get("predicted", {})

    @property
    def fingerprint(self) -> str:
        return self.header["model"]["fingerprint"]

    @property
    def choices(self) -> dict:
        return self.header["choices"]

    def substitution_map(self) -> dict[int, dict]:
        """Per layer {"substitutes", "protected", "drop_ok"}: what runtime.policy.plan_params reads."""
        return {l: {"substitutes": self.substitutes.get(l, {}), "protected": self.protected.get(l, []),
                    "drop_ok": self.drop_ok.get(l, [])} for l in self.slots}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        cache = {"expert_bytes": self.expert_bytes, "slots": {str(l): n for l, n in self.slots.items()},
                 "initial": {str(l): v for l, v in self.initial.items()}}
        subs = {"tau": self.tau, "layers": {str(l): {
            "protected": self.protected.get(l, []), "drop_ok": self.drop_ok.get(l, []),
            "clusters": self.clusters.get(l, []),
            "substitutes": {str(i): [list(t) for t in v] for i, v in self.substitutes.get(l, {}).items()}}
            for l in self.slots}}
        with atomic_dir(path) as tmp:
            write_json(tmp / CACHE_FILE, cache)
            write_json(tmp / SUBS_FILE, subs)
            write_json(tmp / HEADER_FILE, self.header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        header = read_header(path / HEADER_FILE, FORMAT, FORMAT_VERSION, "plan")
        try:
            cache = json.loads((path / CACHE_FILE).read_text())
            subs = json.loads((path / SUBS_FILE).read_text())
            layers = subs["layers"]
            plan = cls(
                header=header, expert_bytes=int(cache["expert_bytes"]),
                slots={int(l): int(n) for l, n in cache["slots"].items()},
                initial={int(l): [int(e) for e in v] for l, v in cache.get("initial", {}).items()},
                substitutes={int(l): {int(i): [(int(j), float(s), float(e)) for j, s, e in v]
                                      for i, v in d["substitutes"].items()} for l, d in layers.items()},
                protected={int(l): [int(e) for e in d.get("protected", [])] for l, d in layers.items()},
                drop_ok={int(l): [int(e) for e in d.get("drop_ok", [])] for l, d in layers.items()},
                clusters={int(l): [int(e) for e in d.get("clusters", [])] for l, d in layers.items()})
            _ = plan.alpha, plan.tau, plan.fingerprint, plan.budget
        except FileNotFoundError as exc:
            raise UserError(f"plan {path} is incomplete: {Path(exc.filename or '').name} is missing; "
                            "re-run moe-compile") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"plan {path} is corrupt ({exc.__class__.__name__}: {exc}); re-run moe-compile") from None
        return plan
