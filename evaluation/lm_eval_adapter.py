"""lm-evaluation-harness model "understudy": every request runs through the runtime, with the policy applied.

    moe-lm-eval --model understudy --model_args model=DIR,plan=PLAN_DIR --tasks wikitext,arc_challenge
    moe-lm-eval --model understudy --model_args model=DIR,policy=smoe,cache=25%,lossless=True --tasks ...

(`moe-lm-eval` is lm-eval's own CLI with this module imported first: lm-eval 0.4.13 finds models only in its
registry, filled by imports, and has no entry-point group for outside models; see evaluation/lm_eval_cli.py.)

model_args (each maps onto runtime.config.RunConfig unless said otherwise):
  model=DIR           the checkpoint (required)
  plan=PLAN_DIR       a compiled plan (policy plan)          policy=resident|lru|lfu|lfru|static|smoe|plan
  cache=N|P%          cache size without a plan              lossless=True|False (no understudies, no drops)
  profile=DIR         policy static: the profile whose most frequent experts it pins
  link=BW[,LAT]       emulated host-to-device link (on lm-eval's CLI quote it, link='50MB/s,20us': its parser
                      splits model_args at unquoted commas)
  dtype, device, store, alpha, host_compute                 as moe-run's flags
  batch_size=B        rows stepped together (rolling windows; generate_until prompts); lm-eval's --batch_size too
  max_length=L        the context window of scoring and generation (default: the model's positions, else 2048)
A bad argument is a one-line UserError (moe-lm-eval prints it on one line and exits 2).

Scoring: Runtime.teacher_force, not Runtime.forward.
  The expert cache is stateful, and what a policy does (hits, understudies, drops, loads) depends on the traffic it
  is served. Runtime.forward is one prefill pass: every MoE layer call gets all S tokens of the sequence as one
  batch, so the schedule serves and loads for S tokens at once (loads shared across the sequence, batch
  understudies among S tokens): neither the decode traffic plans are compiled and simulated for, nor what the
  model sees while it generates. Runtime.teacher_force steps the tokens one at a time through the KV cache: each
  position is one decode step, the cache sees the request sequence it sees when generating, and understudies and
  drops happen where they would. It is how moe-eval measures perplexity and task accuracy (evaluation.passes), so
  numbers from lm-eval and from moe-eval mean the same thing; with lossless=True the logits equal HF's (the test
  checks the log-likelihoods against transformers in float32). The price is one forward call per token.
  The cache is never reset between requests (as in a long generation session), so results under a lossy policy
  depend on the order of the requests; lm-eval gives them in a fixed order, so a run is reproducible.

  loglikelihood(context, continuation) = sum_k log softmax(z_k)[c_k], z_k: the logits [V] predicting continuation
    token c_k from the context and c_<k; is_greedy = all_k argmax z_k == c_k. Tokenization as lm-eval's HF model:
    continuation = tokens(context + continuation)[len(tokens(context)):], trailing spaces of the context moved to
    the continuation, an empty context replaced by the prefix token (BOS, else EOS). Requests that share a context
    (the choices of a question) are one group: the context is stepped once (batch 1), its KV cache repeated to one
    row per continuation and the continuations stepped as one batch (evaluation.passes.choice_scores). Context +
    continuation over max_length + 1 tokens: the context is cut from the left, as lm-eval's HF model does.
  loglikelihood_rolling(text) = sum over lm-eval's disjoint rolling windows (prefix token, max_length) of the
    window's loglikelihood; windows of all texts, batch_size at a time, right-padded rows
    (evaluation.passes.pair_scores).
  generate_until: Runtime.generate_ids on left-padded prompts (prefill, then decode: the runtime's own generation
    path), greedy unless the request's gen_kwargs ask for sampling (do_sample with temperature > 0, top_p); up to
    max_gen_toks (default 256) new tokens, cut at EOS, then at the first of the `until` strings (post hoc).
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from artifacts.errors import UserError
from evaluation.passes import choice_scores, pair_scores
from evaluation.tasks import EncodedTask

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from runtime.runtime import Runtime

log = logging.getLogger("understudy")

Tokens = list[int]
Request = tuple[Any, Tokens, Tokens]        # ((context, continuation) | None, context tokens, continuation tokens)


@register_model("understudy")
class UnderstudyLM(TemplateLM):
    DEFAULT_MAX_LENGTH = 2048                # when the model states no position limit (lm-eval's HF default)
    DEFAULT_MAX_GEN_TOKS = 256               # lm-eval's HF default
    RUN_ARGS = ("plan", "policy", "cache", "profile", "lossless", "link", "device", "dtype", "store", "alpha",
                "host_compute")
    LM_ARGS = ("model", "batch_size", "max_length", "max_batch_size", "trust_remote_code")
    GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")    # gen_kwargs honoured

    def __init__(self, model: str | None = None, batch_size: int | str | None = 1, max_length: int | None = None,
                 max_batch_size: int | None = None, trust_remote_code: bool | None = None, **run_args: Any) -> None:
        """`run_args`: RunConfig fields (RUN_ARGS). max_batch_size (lm-eval's --batch_size auto) and
        trust_remote_code (the runtime never runs remote code) are accepted and ignored."""
        super().__init__()
        from runtime.config import RunConfig
        from runtime.runtime import Runtime

        unknown = sorted(set(run_args) - set(self.RUN_ARGS))
        if unknown:
            raise UserError(f"unknown model_args {', '.join(unknown)} for --model understudy; use "
                            f"{', '.join(self.LM_ARGS[:3] + self.RUN_ARGS)}")
        if not model:
            raise UserError("--model understudy needs model_args model=DIR (a checkpoint directory), e.g. "
                            "--model_args model=DIR,plan=PLAN_DIR")
        self._batch_size = _positive_int(batch_size, "batch_size")
        config = RunConfig(**_run_fields(run_args)).checked()
        self.model_dir = str(model)
        self.rt: Runtime = Runtime.load(self.model_dir, config)
        if self.rt.tokenizer is None:
            self.rt.close()
            raise UserError(f"{model} has no tokenizer; lm-eval needs one (save the tokenizer with the checkpoint)")
        self.tokenizer = self.rt.tokenizer
        limit = self.rt.lm.arch.max_positions
        self._max_length = (limit or self.DEFAULT_MAX_LENGTH) if max_length is None else _positive_int(
            max_length, "max_length")
        if self._max_length < 2 or (limit is not None and self._max_length > limit):
            self.rt.close()
            span = "at least 2" if limit is None else f"2 to {limit} (the model's positions)"
            raise UserError(f"model_args max_length must be {span}; got {max_length}")
        self._device = self.rt.lm.device
        bos = self.tokenizer.decode([self.prefix_token_id])
        self._bos_text = bos or None
        log.info("understudy: %s, policy %s%s", self.model_dir, self.rt.stats.policy,
                 "" if self.rt.budget is None else f"; {self.rt.budget.describe()}")

    # ---- the harness's hooks -----------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "UnderstudyLM":
        """key=value,key=value as lm-eval reads it, except that a piece without "=" continues the value before it
        (link=50MB/s,20us: the link's latency)."""
        from lm_eval.utils import handle_arg_string

        pieces: list[str] = []
        for piece in (arg_string or "").split(","):
            if "=" in piece or not pieces:
                pieces.append(piece)
            else:
                pieces[-1] += "," + piece
        args = {}
        for piece in pieces:
            if piece.strip():
                key, _, value = piece.partition("=")
                args[key.strip()] = handle_arg_string(value)
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None
                            ) -> "UnderstudyLM":
        """model_args win over lm-eval's own batch_size/device (its CLI always passes them, batch_size 1 and device
        cuda:0 by default, so they cannot tell a choice from a default). lm-eval's device falls back to the CPU
        where CUDA is missing (as its HF model does when none is given); model_args device=cuda does not."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        device = extra.get("device")
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("understudy: CUDA is not available; running on the CPU (lm-eval's --device %s)", device)
            extra["device"] = "cpu"
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self.rt.eos_id if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self.DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.model_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> Tokens:
        """As lm-eval's HF model: the tokenizer's own special tokens unless told, none when the text already starts
        with the prefix (BOS) text."""
        special: dict[str, bool] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            special = {"add_special_tokens": False}
        return list(self.tokenizer.encode(string, **special))

    def tok_decode(self, tokens: Tokens | int, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens,
                                     skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        """Added to the results' "config": what ran and what the expert cache did over the whole run."""
        rt = self.rt
        cfg = rt.config
        return {"understudy": {
            "model": self.model_dir, "policy": rt.stats.policy, "plan": None if cfg.plan is None else str(cfg.plan),
            "cache": cfg.cache, "lossless": cfg.lossless, "link": None if cfg.link is None else str(cfg.link),
            "dtype": str(rt.lm.dtype).replace("torch.", ""), "max_length": self.max_length,
            "budget": None if rt.budget is None else rt.budget.describe(),
            "scoring": "teacher_force (one decode step per token)", "stats": rt.stats.to_dict()}}

    # ---- loglikelihood -----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(loglik, is_greedy) per request; requests with one (cut) context share its steps (choice_scores)."""
        groups: dict[tuple[int, ...], list[int]] = {}        # context tokens -> request indices, in request order
        conts: list[tuple[int, ...]] = []
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = self._fit(ctx, cont)
            groups.setdefault(tuple(ctx), []).append(i)
            conts.append(tuple(cont))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), desc="understudy loglikelihood", disable=disable_tqdm) as bar:
            for ctx, members in groups.items():
                scores = choice_scores(self.rt, EncodedTask(ctx, tuple(conts[i] for i in members)))
                for i, s in zip(members, scores):
                    out[i] = s
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], s)
                bar.update(len(members))
        return out

    def _fit(self, ctx: Tokens, cont: Tokens) -> tuple[Tokens, Tokens]:
        """The context cut from the left so that context + continuation[:-1] fits max_length positions (what
        lm-eval's HF model feeds: (context + continuation)[-(max_length + 1):][:-1])."""
        if not cont:
            raise UserError("a loglikelihood request has an empty continuation (no tokens to score); check the "
                            "task's target")
        if len(cont) > self.max_length:
            raise UserError(f"a continuation of {len(cont)} tokens is over max_length {self.max_length}; raise "
                            "model_args max_length (up to the model's positions) or shorten the task's targets")
        over = len(ctx) + len(cont) - 1 - self.max_length
        return (ctx[over:] if over > 0 else ctx), cont

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's loglikelihood: the sum over lm-eval's disjoint rolling windows (prefix token first, windows of
        max_length, each token predicted once), the windows of all texts batch_size at a time."""
        windows: list[tuple[int, Tokens, Tokens]] = []            # (text index, context, continuation)
        texts = [req.args[0] for req in requests]
        for n, text in enumerate(texts):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((n, ctx, cont))
        totals = [0.0] * len(texts)
        with tqdm(total=len(windows), desc="understudy loglikelihood_rolling", disable=disable_tqdm) as bar:
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size]
                for (n, _, _), (ll, _) in zip(batch, pair_scores(self.rt, [(c, t) for _, c, t in batch])):
                    totals[n] += ll
                bar.update(len(batch))
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]                     # (context, gen_kwargs)
        groups: dict[str, list[int]] = {}                         # one sampling setting per batch
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out = [""] * len(args)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        with tqdm(total=len(args), desc="understudy generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = dict(normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
                top_p = kwargs.pop("top_p", None)
                if kwargs:
                    log.warning("understudy: gen_kwargs %s are not supported and ignored (supported: %s)",
                                ", ".join(sorted(kwargs)), ", ".join(self.GEN_KEYS))
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise UserError(f"max_gen_toks {max_gen} leaves no room for the prompt in max_length "
                                    f"{self.max_length}; raise model_args max_length or lower max_gen_toks")
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    texts = self._generate([args[i][0] for i in batch], max_ctx, max_gen, temperature,
                                           None if top_p is None else float(top_p))
                    for i, text in zip(batch, texts):
                        out[i] = postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", args[i], out[i])
                    bar.update(len(batch))
        return out

    def _generate(self, contexts: list[str], max_ctx: int, max_gen: int, temperature: float,
                  top_p: float | None) -> list[str]:
        """Continuations (text up to EOS) of `contexts`, each cut to its last max_ctx tokens and left-padded."""
        rows = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
        width = max(len(r) for r in rows)
        pad = self.rt.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device)        # [B, width]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self._device)
        tokens = self.rt.generate_ids(ids, mask, max_new_tokens=max_gen, temperature=temperature, top_p=top_p)
        # a row ends at an end-of-sequence token, then holds padding: the config's EOS, and every EOS the runtime
        # stops at where it knows several (Runtime.eos_ids: the generation config's end-of-turn token too)
        ends = set(getattr(self.rt, "eos_ids", ())) | ({self.rt.eos_id} - {None})
        texts = []
        for row in tokens.tolist():                               # [<= max_gen]
            texts.append(self.tok_decode(row[:next((n for n, t in enumerate(row) if t in ends), len(row))]))
        return texts

    def close(self) -> None:
        self.rt.close()


def _positive_int(value: Any, name: str) -> int:
    """A model_args count: an int, or its digits as text."""
    n = value if isinstance(value, int) and not isinstance(value, bool) else (
        int(value) if isinstance(value, str) and value.strip().isdigit() else 0)
    if n < 1:
        raise UserError(f"model_args {name} must be a positive whole number (got {value!r})"
                        + ("; understudy has no automatic batch size" if str(value).startswith("auto") else ""))
    return n


def _run_fields(run_args: dict[str, Any]) -> dict[str, Any]:
    """model_args (as lm-eval parsed them: bool, int, float or str) -> RunConfig fields, type-checked."""
    out: dict[str, Any] = {}
    for k, v in run_args.items():
        if v is None:
            continue
        if k in ("lossless", "host_compute"):
            if v not in (True, False, 0, 1):             # lm-eval turns true/false/1/0 into bool/int
                raise UserError(f"model_args {k} must be True or False (got {v!r})")
            v = bool(v)
        elif k == "alpha":
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise UserError(f"model_args alpha must be a number (got {v!r})") from None
        elif k != "cache":                                # cache: a slot count (int) or a share ("25%")
            v = str(v)
        out[k] = v
    return out
