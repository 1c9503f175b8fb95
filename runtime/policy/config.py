"""Named policies and their parameters (one frozen dataclass; the CLI and Runtime.load map onto it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from artifacts.errors import UserError

POLICIES = ("resident", "lru", "lfu", "lfru", "static", "smoe", "plan")   # what the runtime runs ("plan" last)
SIMULATED_ONLY = ("oracle",)          # the simulator's too: Belady's MIN reads the future, so only a trace can run it
SIZED_BY_CACHE = ("lru", "lfu", "lfru", "static", "smoe")                 # need --cache (or a plan's slots)


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "lru"
    alpha: float = 0.0               # score band for substitution (0 = lossless)
    eviction: str = "lru"            # "lru" | "score" (lowest mean gate score over `window` steps) | "lfu" | "lfru" |
                                     # "belady" (oracle only); the rules: runtime.policy.eviction
    window: int = 16                 # n decode steps of the score window
    prefetch: bool = False           # prefetch the next layer's predicted top-score experts
    prefetch_max: int | None = None  # prefetches per layer call (default: top_k)
    prefetch_guard: bool = False     # a prefetch may only evict an expert of lower recent mean score (ours)
    host_compute: bool = False       # compute the lowest-score misses on the host when that beats loading (where the
                                     # host is another processor: the runtime turns it off on a CPU device)
    understudy_weight: str = "own"   # "own": coef * gate_j (SMoE) | "replaced": the replaced expert's weight |
                                     # "auto" (plan): near-twins take the replaced weight, band understudies their own
    pool_depth: int | None = None    # band understudies among the token's d best inactive experts (None: any)
    use_batch: bool = True           # other tokens' top-score experts may stand in

    @property
    def offloads(self) -> bool:
        return self.name != "resident"

    @property
    def pins(self) -> bool:
        """Whether the cache starts with a profile's most frequent experts pinned (runtime.policy.static)."""
        return self.name == "static"


def check_runnable(name: str) -> str:
    """`name` if the runtime can run it, else a one-line UserError."""
    if name in SIMULATED_ONLY:
        raise UserError(f"policy {name!r} (Belady's optimal eviction) needs the future, so only the simulator runs "
                        "it: see the comparison table moe-compile prints; choose one of " + ", ".join(POLICIES))
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return name


def preset(name: str, lossless: bool = False, **overrides) -> PolicyConfig:
    """The named policy with its defaults; `lossless` forces alpha = 0 (no understudies, no drops)."""
    if name not in POLICIES + SIMULATED_ONLY:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES + SIMULATED_ONLY)}")
    base = {
        "resident": PolicyConfig(name="resident"),
        "lru": PolicyConfig(name="lru"),
        "lfu": PolicyConfig(name="lfu", eviction="lfu"),
        "lfru": PolicyConfig(name="lfru", eviction="lfru"),
        # the profile's most frequent experts pinned, one streaming slot per layer, cold experts on the host
        # where cheaper (runtime.policy.static)
        "static": PolicyConfig(name="static", host_compute=True),
        "oracle": PolicyConfig(name="oracle", eviction="belady"),
        # SMoE: alpha 0.25-0.35 in the paper; score eviction; pinning; next-layer prefetch; host/transfer split
        "smoe": PolicyConfig(name="smoe", alpha=0.3, eviction="score", prefetch=True, host_compute=True),
        "plan": PolicyConfig(name="plan", alpha=0.3, eviction="score", prefetch=True, host_compute=True,
                             understudy_weight="auto", prefetch_guard=True),
    }[name]
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if lossless:
        cfg = replace(cfg, alpha=0.0)
    return cfg
