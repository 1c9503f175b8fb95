"""Named policies and their parameters (one frozen dataclass; the CLI and Runtime.load map onto it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from artifacts.errors import UserError

POLICIES = ("resident", "lru", "smoe", "plan")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "lru"
    alpha: float = 0.0               # score band for substitution (0 = lossless)
    eviction: str = "lru"            # "lru" | "score" (lowest mean gate score over `window` steps)
    window: int = 16                 # n decode steps of the score window
    prefetch: bool = False           # prefetch the next layer's predicted top-score experts
    prefetch_max: int | None = None  # prefetches per layer call (default: top_k)
    prefetch_guard: bool = False     # a prefetch may only evict an expert of lower recent mean score (ours)
    host_compute: bool = False       # compute the lowest-score misses on the host when that beats loading
    understudy_weight: str = "own"   # "own": coef * gate_j (SMoE) | "replaced": the replaced expert's weight |
                                     # "auto" (plan): near-twins take the replaced weight, band understudies their own
    pool_depth: int | None = None    # band understudies among the token's d best inactive experts (None: any)
    use_batch: bool = True           # other tokens' top-score experts may stand in

    @property
    def offloads(self) -> bool:
        return self.name != "resident"


def preset(name: str, lossless: bool = False, **overrides) -> PolicyConfig:
    """The named policy with its defaults; `lossless` forces alpha = 0 (no understudies, no drops)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    base = {
        "resident": PolicyConfig(name="resident"),
        "lru": PolicyConfig(name="lru"),
        # SMoE: alpha 0.25-0.35 in the paper; score eviction; pinning; next-layer prefetch; host/transfer split
        "smoe": PolicyConfig(name="smoe", alpha=0.3, eviction="score", prefetch=True, host_compute=True),
        "plan": PolicyConfig(name="plan", alpha=0.3, eviction="score", prefetch=True, host_compute=True,
                             understudy_weight="auto", prefetch_guard=True),
    }[name]
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if lossless:
        cfg = replace(cfg, alpha=0.0)
    return cfg
