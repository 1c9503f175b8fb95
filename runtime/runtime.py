"""The runtime's Python API: load a checkpoint with offloaded experts, decode, evaluate.

    rt = Runtime.load("demo/model", policy="smoe", cache="25%", link="50MB/s,20us")
    rt.generate(["The function returns"], max_new_tokens=32)
    rt.stats.summary(); rt.forward(input_ids)  # logits [B, S, V]
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from artifacts.errors import UserError
from artifacts.plan import Plan
from artifacts.profile import Profile
from runtime.budget import CacheBudget
from runtime.expert_cache import ExpertCache
from runtime.expert_store import ExpertStore
from runtime.fingerprint import model_fingerprint
from runtime.config import RunConfig, SamplingConfig
from runtime.generate import decode
from runtime.link import parse_link
from runtime.loader import Loader
from runtime.model_loader import LoadedModel, load_model, load_tokenizer, next_layer_router, pair_routers
from runtime.offload_executor import OffloadExecutor
from runtime.policy.config import PolicyConfig, preset
from runtime.policy.fast import make_cache_model
from runtime.policy.slots import resolve_slots
from runtime.policy.static import static_pins
from runtime.policy.substitution import substitutes
from runtime.policy.plan_params import plan_policy, plan_pools, substitution_params
from runtime.policy.pools import native_slots
from runtime.pooled_store import PooledStore
from runtime.quantize import scheme_from
from runtime.resident import ResidentExecutor
from runtime.stats import RunStats

log = logging.getLogger("understudy")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_model(what: str, model: dict, lm: LoadedModel, model_dir, remedy: str) -> None:
    """An artifact's model section names this model: same routers (fingerprint), MoE layers and expert count."""
    fp = model_fingerprint(lm.arch, lm.config, lm.ckpt)
    if model["fingerprint"] != fp:
        raise UserError(f"{what} was made for another model (fingerprint {model['fingerprint']}, this model "
                        f"{fp}); {remedy} for {model_dir}")
    if list(model["moe_layers"]) != list(lm.arch.moe_layers) or model["num_experts"] != lm.arch.num_experts:
        raise UserError(f"{what}'s model section (MoE layers {model['moe_layers']}, {model['num_experts']} experts) "
                        f"does not match {model_dir} ({list(lm.arch.moe_layers)}, {lm.arch.num_experts}); {remedy}")


def check_plan_matches(plan: Plan, lm: LoadedModel, model_dir) -> None:
    """The plan was compiled for this model."""
    _check_model("plan", plan.header["model"], lm, model_dir, "re-run moe-profile and moe-compile")


def check_profile_matches(profile: Profile, lm: LoadedModel, model_dir) -> None:
    """The profile was measured on this model."""
    _check_model("profile", profile.header["model"], lm, model_dir, "re-run moe-profile")


class Runtime:
    def __init__(self, lm: LoadedModel, policy: PolicyConfig, store: ExpertStore, tokenizer=None,
                 executor=None, cache: ExpertCache | None = None, loader: Loader | None = None,
                 plan: Plan | None = None, stats: RunStats | None = None, budget: CacheBudget | None = None,
                 config: RunConfig | None = None):
        self.lm, self.policy, self.store, self.tokenizer = lm, policy, store, tokenizer
        self.config = config or RunConfig(policy=policy.name)
        self.budget = budget          # the expert-cache budget honoured (None for resident: nothing offloaded)
        self.executor, self.cache, self.loader, self.plan = executor, cache, loader, plan
        self.stats = stats or RunStats(policy=policy.name)
        self.last_finish_reason: str | None = None   # why the last `stream` ended

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, config: RunConfig | None = None, *, plan: str | Path | Plan | None = None,
             record_events: bool = False, **options) -> "Runtime":
        """Load `model_dir` for a run: `config` (a RunConfig), or its fields as keywords (policy, cache, profile,
        lossless, link, device, dtype, store, alpha, host_compute, sampling). `plan`: a plan directory or a Plan.
        Further keywords override the policy's parameters (window, prefetch, prefetch_max, understudy_weight,
        use_batch, pool_depth)."""
        fields = RunConfig.__dataclass_fields__
        if config is None:
            config = RunConfig(**{k: v for k, v in options.items() if k in fields})
        if plan is not None:
            config = replace(config, plan=plan)
        policy_overrides = {k: v for k, v in options.items() if k not in fields}
        policy_overrides.update(alpha=config.alpha, host_compute=config.host_compute)
        # everything a user passes is checked before the model is read
        config = config.checked()
        policy, cache, lossless = config.resolved_policy, config.cache, config.lossless
        the_plan = (config.plan.validate() if isinstance(config.plan, Plan)
                    else None if config.plan is None else Plan.load(config.plan))
        the_profile = config.profile
        if isinstance(the_profile, Profile):
            the_profile.validate("profile (in memory)")
        elif the_profile is not None:
            the_profile = Profile.load(the_profile, with_trace=False)
        the_link = parse_link(config.link) if isinstance(config.link, str) else config.link
        lm = load_model(model_dir, config.device, config.dtype)
        if the_plan is not None:
            check_plan_matches(the_plan, lm, model_dir)
        if the_profile is not None:
            check_profile_matches(the_profile, lm, model_dir)
        use_plan = the_plan is not None and policy == "plan"
        if policy_overrides.get("host_compute") is None and not use_plan:   # the host is the device on a CPU run
            policy_overrides["host_compute"] = lm.device.type == "cuda" and preset(policy).host_compute
        if use_plan:
            cfg, params = plan_policy(the_plan.choices, lm.arch.moe_layers, the_plan.substitution_map(), lossless,
                                      **policy_overrides)
        else:
            cfg = preset(policy, lossless=lossless, **policy_overrides)
            params = substitution_params(cfg, lm.arch.moe_layers)
        mode = ("host" if lm.device.type == "cuda" else "mmap") if config.store == "auto" else config.store
        tok = load_tokenizer(model_dir)
        if not cfg.offloads:   # every expert resident in the compute dtype (a quantized one dequantized at load)
            experts = ExpertStore(lm.ckpt, lm.arch, lm.dtype, mode="mmap")
            stats = RunStats(policy=cfg.name, native=experts.format_name)
            rt = cls(lm, cfg, experts, tok, executor=ResidentExecutor(experts, lm.device, lm.dtype, stats),
                     stats=stats, config=config)
            rt.stats.cache_capacity_bytes = rt.stats.peak_cache_bytes = (
                experts.expert_bytes * lm.arch.num_experts * len(lm.arch.moe_layers))
            rt._install(rt.executor)
            return rt
        # offloaded experts are held and moved as the checkpoint stores them (its dtype, or packed for a quantized
        # checkpoint: what plans count), computed in lm.dtype
        experts = ExpertStore(lm.ckpt, lm.arch, None, mode=mode, pin=lm.device.type == "cuda")
        pools = None
        if use_plan:
            if the_plan.expert_bytes != experts.expert_bytes:
                raise UserError(f"the plan counts experts of {the_plan.expert_bytes} B ({the_plan.expert_dtype}), "
                                f"this checkpoint's are {experts.expert_bytes} B ({experts.format_name}); "
                                "profile and compile this checkpoint")
            slots = {l: the_plan.slots[l] for l in lm.arch.moe_layers}
            if the_plan.precision is not None and lossless:     # bit-exact: every expert at the checkpoint's format
                slots = native_slots(plan_pools(the_plan.precision, lm.arch.moe_layers, experts.expert_bytes),
                                     the_plan.cache_budget_bytes)
            elif the_plan.precision is not None:
                pools = plan_pools(the_plan.precision, lm.arch.moe_layers, experts.expert_bytes)
                schemes = {n: scheme_from({"name": n, **d}) for n, d in the_plan.precision["schemes"].items()}
                experts = PooledStore(experts, pools, schemes, pin=lm.device.type == "cuda",
                                      compute=(lm.device, lm.dtype))
            budget = CacheBudget(sum(slots.values()), experts.expert_bytes, experts.format_name, _name(lm.dtype),
                                 the_plan.cache_budget_bytes, "the plan",
                                 pools=() if pools is None else tuple(
                                     (n, sum(pools.slots[l][p] for l in slots), pools.bytes[p])
                                     for p, n in enumerate(pools.names) if any(pools.slots[l][p] for l in slots)))
        else:
            slots = resolve_slots(cache, lm.arch.moe_layers, lm.arch.num_experts)
            budget = CacheBudget(sum(slots.values()), experts.expert_bytes, experts.format_name, _name(lm.dtype),
                                 None, f"--cache {cache}")
        if budget.limit_bytes is not None and budget.capacity_bytes > budget.limit_bytes:
            raise UserError(f"{budget.describe()} exceeds the plan's budget; re-run moe-compile")
        kv = (ExpertCache(experts.base.specs, slots, lm.device, pools=pools, pool_specs=experts.pool_specs)
              if pools is not None else ExpertCache(experts.specs, slots, lm.device, flat=experts.flat_layout))
        loader = Loader(experts, lm.device, the_link)
        stats = RunStats(policy=cfg.name + (" (lossless)" if lossless else ""), cache_capacity_bytes=kv.capacity_bytes,
                         native=experts.format_name)
        initial = the_plan.initial if use_plan else {}
        pinned = static_pins(the_profile.frequency, slots) if cfg.pins else None
        # the lean cache model where it applies (lossless lru/lfu/lfru), else the reference one
        model = make_cache_model(slots, lm.arch.num_experts, lm.arch.top_k, cfg, params, initial=initial,
                                 pinned=pinned, pools=pools)
        width = min((the_plan.choices.width if use_plan else None) or 2 * lm.arch.top_k, lm.arch.num_experts)
        executor = OffloadExecutor(experts, kv, loader, model, cfg, stats, width, next_router=next_layer_router(lm),
                                   record_events=record_events)
        # a substituting policy that prefetches routes with the next layer's prediction in one matmul (MoEBlock.pair)
        pair_routers(lm, cfg.prefetch and substitutes(params))
        rt = cls(lm, cfg, experts, tok, executor=executor, cache=kv, loader=loader, plan=the_plan, stats=stats,
                 budget=budget, config=config)
        log.info(budget.describe())
        rt._install(executor)
        rt._warm(model.resident)
        return rt

    def _install(self, executor) -> None:
        for block in self.lm.blocks.values():
            block.executor = executor

    def _warm(self, resident: dict[int, set[int]]) -> None:
        """Load the initial residents the cache model starts with (the plan's, or static's pinned experts; not
        counted as run loads)."""
        for l, experts in resident.items():
            for e in sorted(experts):
                self.store.copy_into(l, e, self.cache.assign(l, e))

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- use -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] of one forward pass (no KV cache), through the policy."""
        ids = torch.as_tensor(input_ids, device=self.lm.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.lm.model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def teacher_force(self, input_ids: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab], feeding the tokens one step at a time with the KV cache, so the expert cache
        sees the same sequence of requests as when generating (what evaluation and the simulator compare with).
        Pass `cache` (a DynamicCache) to continue a sequence; it is extended in place."""
        ids = torch.as_tensor(input_ids, device=self.lm.device)
        if ids.dim() == 1:
            ids = ids[None]
        cache = DynamicCache(config=self.lm.config) if cache is None else cache
        self._check_length(cache.get_seq_length() + ids.shape[1], f"{cache.get_seq_length() + ids.shape[1]} tokens")
        out = []
        for t in range(ids.shape[1]):
            out.append(self.lm.model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
        self.stats.decode_positions += ids.numel()
        self.stats.tokens += ids.numel()
        if self.cache is not None:
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache.peak_bytes)
        return torch.stack(out, dim=1)

    def _check_length(self, n: int, what: str) -> None:
        limit = self.lm.arch.max_positions
        if limit is not None and n > limit:
            raise UserError(f"{what} is over the model's limit of {limit} positions; shorten the prompt or ask "
                            "for fewer new tokens")

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise UserError(f"{self.lm.ckpt.dir} has no tokenizer; pass token ids instead of text")
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] or [self.eos_id] for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.lm.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.lm.device)
        return ids, mask

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence token (the config's first, else the tokenizer's)."""
        eos = getattr(self.lm.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return eos

    @property
    def eos_ids(self) -> set[int]:
        """Every token that ends a sequence: the config's, the generation config's (chat models list their
        end-of-turn token there) and the tokenizer's."""
        out: set[int] = set()
        for v in (getattr(self.lm.config, "eos_token_id", None), self.lm.generation_eos,
                  None if self.tokenizer is None else self.tokenizer.eos_token_id):
            out.update(v if isinstance(v, list) else [] if v is None else [v])
        return out

    @property
    def pad_id(self) -> int:
        """The padding token prompts are left-padded with (the config's, the tokenizer's, else EOS, else 0)."""
        pad = getattr(self.lm.config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.eos_id or 0)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 on_step: Callable[[torch.Tensor], None] | None = None,
                 input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **sampling) -> list[str]:
        """Decode continuations of `prompts` (a static batch; or of `input_ids`, already encoded) and return their
        texts (up to EOS, and up to the first stop string); statistics accumulate in `self.stats`. `generate_ids`
        returns the token ids; `stream` yields text as it is produced. Sampling arguments (those above and any
        SamplingConfig field: top_k, repetition_penalty, frequency_penalty, presence_penalty, stop) left as None
        take the run's `config.sampling`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if input_ids is None:
            input_ids, attention_mask = self.encode(prompts)
        sampling.update(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        cfg = self._sampling(**sampling)
        tokens = self.generate_ids(input_ids, attention_mask, on_step=on_step, **sampling)
        if self.tokenizer is None:
            return [" ".join(map(str, row)) for row in tokens.tolist()]
        eos, texts = self.eos_ids, []
        for row in tokens.tolist():
            end = next((n for n, t in enumerate(row) if t in eos), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            cut = [at for s in cfg.stop if (at := text.find(s)) != -1]
            texts.append(text[:min(cut)] if cut else text)
        return texts

    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[str]:
        """Yield the continuation of one prompt (text, or token ids) as its text becomes final, through the
        same continuous-batching engine the server uses; stops at EOS, a stop string or max_new_tokens. Sampling
        keywords as in `generate`. `self.last_finish_reason` says why it stopped ("stop" or "length")."""
        from runtime.engine import Delta, Engine

        ids = self.encode_one(prompt) if isinstance(prompt, str) else list(prompt)
        engine = Engine(self, max_batch=1)
        out: list[Delta] = []
        engine.submit(ids, self._sampling(**sampling), out.append)
        busy = True
        while busy or out:
            while out:
                d = out.pop(0)
                if d.text:
                    yield d.text
                if d.finish_reason is not None:
                    if d.error is not None:
                        raise RuntimeError(d.error)
                    self.last_finish_reason = d.finish_reason
            if busy:
                busy = engine.step()

    def encode_one(self, text: str) -> list[int]:
        """Token ids of one prompt (no special tokens added: the prompt is the text as given)."""
        if self.tokenizer is None:
            raise UserError(f"{self.lm.ckpt.dir} has no tokenizer; pass token ids instead of text")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.eos_id]

    def _sampling(self, **given) -> SamplingConfig:
        """The run's sampling defaults with the given (non-None) fields replaced, checked."""
        unknown = set(given) - set(SamplingConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        given = {k: (tuple(v) if k == "stop" and not isinstance(v, str) else (v,) if k == "stop" else v)
                 for k, v in given.items() if v is not None}
        return replace(self.config.sampling, **given).checked()

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, on_step: Callable[[torch.Tensor], None] | None = None,
                     **sampling) -> torch.Tensor:
        """New token ids [batch, n <= max_new_tokens] continuing left-padded `input_ids` [batch, seq]; a row that
        reached EOS holds EOS then padding. Statistics accumulate in `self.stats`."""
        input_ids = torch.as_tensor(input_ids, device=self.lm.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        sampling.update(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        cfg = self._sampling(**sampling)
        max_new_tokens = cfg.max_new_tokens
        self._check_length(input_ids.shape[1] + max_new_tokens,
                           f"a prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens")
        s = self.stats

        def on_phase(name: str) -> None:
            s.phase = name

        try:
            tokens, timing = decode(self.lm.model, input_ids, attention_mask, cfg, self.eos_ids, self.pad_id,
                                    on_step, on_phase)
        finally:
            s.phase = "decode"
        s.decode_positions += tokens.shape[0] * (tokens.shape[1] - 1)
        s.prompt_tokens += int(attention_mask.sum())
        eos = self.eos_ids
        for row in tokens.tolist():   # real tokens: up to and including EOS (later positions are padding)
            s.tokens += next((n + 1 for n, t in enumerate(row) if t in eos), len(row))
        s.ttft_s = timing["ttft_s"] if s.ttft_s == 0.0 else s.ttft_s
        s.step_s.extend(timing["step_s"])
        if self.cache is not None:
            s.peak_cache_bytes = max(s.peak_cache_bytes, self.cache.peak_bytes)
        return tokens
