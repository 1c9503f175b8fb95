"""One benchmark run's figures, as results.json holds them, and the few reductions every section shares.

A cell is one `evaluation.run_eval.evaluate` result for (model, cache budget, batch); its `policies` entries hold
perplexity, window_nll, top1/greedy agreement, task accuracy, rates, loads, bytes and TPOT per policy.
Shares of the (token, routed expert) pairs, adding up to 1:
    exact = hit_rate - substitution_rate        understudy = substitution_rate
    drop  = drop_rate     host = host_rate      miss = 1 - hit_rate - drop_rate - host_rate
Displayed values are rounded (rates to 3 decimals, ratios and loads to 2); every comparison that a sentence or a
goal states is made on the displayed values, so the text agrees with the tables it sits under.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.stats import paired_bootstrap

REFERENCE = "resident"
BASELINE = "lru"                                   # ratios are to lru in the same cell
OFFLOADED = ("lru", "smoe", "plan", "plan-hits")
LOSSY = ("smoe", "plan", "plan-hits")
PLANS = ("plan", "plan-hits")
POLICIES = (REFERENCE, *OFFLOADED)
HITS_MAX_ERROR = 0.015                             # plan-hits: `moe-compile --max-error 0.015`


def cell_key(model: str, pct: str, batch: int) -> str:
    return f"{model}|{pct}|{batch}"


def r3(x: float) -> float:
    return round(float(x), 3)


def r2(x: float) -> float:
    return round(float(x), 2)


def shares(d: dict) -> dict[str, float]:
    """exact / understudy / drop / host / miss shares of one policy entry (formulas in the module docstring)."""
    exact = d.get("exact_hit_rate", d["hit_rate"] - d["substitution_rate"])
    miss = d.get("miss_rate", 1.0 - d["hit_rate"] - d["drop_rate"] - d.get("host_rate", 0.0))
    return {"exact": max(exact, 0.0), "understudy": d["substitution_rate"], "drop": d["drop_rate"],
            "host": d.get("host_rate", 0.0), "miss": max(miss, 0.0)}


def ratio(d: dict, base: dict, key: str) -> float | None:
    """d[key] / base[key]; None when either is missing or the base is 0."""
    a, b = d.get(key), base.get(key)
    return None if a is None or not b else a / b


def signed_ci(t: tuple[float, float, float]) -> str:
    d, lo, hi = t
    return f"{d:+.2f}% [{lo:+.2f}, {hi:+.2f}]"


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Run:
    """results: cell_key -> evaluate result (+ "predicted": plan name -> its plan.json predictions); peers, links,
    profiles: per model; meta: how, where and how long."""
    results: dict
    peers: dict
    links: dict
    profiles: dict
    meta: dict
    _ci: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        return cls(d["results"], d.get("peers", {}), d.get("links", {}), d.get("profiles", {}), d.get("meta", {}))

    def to_dict(self) -> dict:
        return {"meta": self.meta, "links": self.links, "profiles": self.profiles, "peers": self.peers,
                "results": self.results}

    def models(self) -> list[str]:
        return list(dict.fromkeys(k.split("|")[0] for k in self.results))

    def cells(self, model: str) -> list[tuple[str, int, dict]]:
        """(budget "50%", batch, result) of one model, by batch then budget."""
        out = []
        for k, r in self.results.items():
            name, pct, batch = k.split("|")
            if name == model:
                out.append((pct, int(batch), r))
        return sorted(out, key=lambda c: (c[1], float(c[0].rstrip("%"))))

    def cell(self, model: str, pct: str, batch: int = 1) -> dict | None:
        return self.results.get(cell_key(model, pct, batch))

    def ci(self, result: dict, a: str, b: str) -> tuple[float, float, float]:
        """(delta, lo, hi) in percent: policy b's perplexity vs policy a's, paired bootstrap over windows."""
        k = (id(result), a, b)
        if k not in self._ci:
            self._ci[k] = paired_bootstrap(result, a, b)
        return self._ci[k]
