"""One run's configuration: what `moe-run`, `moe-eval`, the Python API and the server share.

    cfg = RunConfig(plan="out/plan", link="50MB/s,20us", sampling=SamplingConfig(max_new_tokens=64))
    rt = Runtime.load("demo/model", config=cfg)

Pure data (no torch): the runtime resolves it when it loads a model. Defaults live here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from artifacts.errors import UserError, check_range

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (applied per row, in this order, to the logits [V]):
    repetition penalty (CTRL, HF):  l_j <- l_j / r if l_j > 0 else l_j * r, for j in prompt + generated
    frequency / presence (OpenAI): l_j <- l_j - c_j * f - [c_j > 0] * p, c_j = times j was generated
    temperature 0 -> argmax; else softmax(l / T), restricted to the top_k tokens, then to the smallest set whose
    mass reaches top_p, renormalised and sampled with the row's generator (seeded)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                    # 0 = no top-k cut
    seed: int = 0
    repetition_penalty: float = 1.0   # 1 = off
    frequency_penalty: float = 0.0    # OpenAI's, in [-2, 2]
    presence_penalty: float = 0.0     # OpenAI's, in [-2, 2]
    stop: tuple[str, ...] = ()        # stop strings: the text ends before the first one found
    ignore_eos: bool = False          # decode max_new_tokens whatever (benchmarks; vLLM's option of that name)

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def checked(self) -> "SamplingConfig":
        check_range(self.max_new_tokens, "--max-new-tokens", 1)
        check_range(self.temperature, "--temperature", 0.0)
        check_range(self.top_p, "--top-p", 0.0, 1.0, lo_open=True)
        check_range(self.top_k, "--top-k", 0)
        check_range(self.repetition_penalty, "--repetition-penalty", 0.0, lo_open=True)
        check_range(self.frequency_penalty, "--frequency-penalty", -2.0, 2.0)
        check_range(self.presence_penalty, "--presence-penalty", -2.0, 2.0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop strings must be non-empty strings")
        return self


@dataclass(frozen=True)
class RunConfig:
    policy: str | None = None         # resident | lru | lfu | lfru | static | smoe | plan; None: plan with a plan,
                                      # else smoe
    plan: object = None               # a plan directory, or an artifacts.Plan (policy plan)
    cache: int | str | None = None    # slots per layer or "P%" of routed-expert bytes (not with a plan)
    profile: object = None            # a profile directory, or an artifacts.Profile (policy static: its most
                                      # frequently routed experts are pinned)
    lossless: bool = False            # no understudies, no drops: logits equal HF's
    link: object = None               # emulated host-to-device link: "50MB/s,20us" or a runtime.link.Link
    device: str = "cpu"
    dtype: object = None              # compute dtype (a name or torch.dtype); None: the checkpoint's where the device
                                      # computes it
    store: str = "auto"               # where offloaded experts live: auto | mmap | host
    alpha: float | None = None        # overrides the policy's (or plan's) score band
    host_compute: bool | None = None  # overrides the policy's (or plan's) host/transfer split
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def resolved_policy(self) -> str:
        return self.policy or ("plan" if self.plan is not None else "smoe")

    def checked(self) -> "RunConfig":
        """Flag-level checks, before any model work (files and the model are checked when loaded)."""
        from runtime.policy.config import SIZED_BY_CACHE, check_runnable

        policy = check_runnable(self.resolved_policy)
        if policy == "plan" and self.plan is None:
            raise UserError("policy 'plan' needs a plan: run moe-compile and pass --plan PLAN_DIR, "
                            "or choose --policy smoe|lru|resident")
        if policy == "plan" and self.cache is not None:
            raise UserError("--cache conflicts with the plan's budget; compile a plan for that budget instead")
        if policy in SIZED_BY_CACHE and self.cache is None:
            raise UserError(f"policy {policy} needs a cache size: --cache N (slots per layer) or --cache P% (of "
                            "routed-expert bytes)" + (", or a plan (--plan)" if policy != "static" else ""))
        if policy == "static" and self.profile is None:
            raise UserError("policy static pins each layer's most frequently routed experts from a profile: pass "
                            "--profile PROFILE_DIR (what moe-profile wrote for this model)")
        if policy != "static" and self.profile is not None:
            raise UserError(f"--profile is read by policy static only (its pinned experts); drop it, or choose "
                            f"--policy static instead of {policy}")
        if self.alpha is not None:
            check_range(self.alpha, "--alpha", 0.0)
        self.sampling.checked()
        return self
