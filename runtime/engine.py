"""Continuous batching over a Runtime: requests join and leave a running batch between decode steps.

Each `step()` (iteration-level scheduling, as Orca and vLLM do):
  1. rows whose request was cancelled (a client went away) leave the batch at once;
  2. waiting requests are admitted up to `max_batch` rows: their prompts are prefilled together (left-padded) on a
     fresh KV cache, their first tokens sampled, and their rows merged into the running batch (runtime.kv_batch);
  3. one decode step runs every row together: the MoE layers see all rows' tokens in one call, so the expert
     cache and the policy serve the batch as a whole (cross-request understudies included);
  4. each row's token is turned into text (runtime.textstream) and handed to its request's `emit`; rows that hit
     EOS, a stop string or their token limit leave the batch.
The runtime is the same object a single `generate` uses: one expert cache, one budget, whatever the load.
Nothing here knows HTTP; the server (runtime.server) and `Runtime.stream` drive it.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from artifacts.errors import UserError
from runtime.config import SamplingConfig
from runtime.kv_batch import can_merge, keep_rows, merge
from runtime.sampling import RowSampler, select
from runtime.textstream import TextStream


class QueueFull(Exception):
    """More requests are waiting than the engine admits; the caller should retry later."""


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request."""

    text: str                       # newly final text (may be empty)
    finish_reason: str | None       # None while running; "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    ttft_s: float | None = None     # on the final delta: arrival to first token (s)
    tpot_s: float | None = None     # on the final delta: mean time per output token after the first (s)
    latency_s: float | None = None  # on the final delta: arrival to the end (s)


@dataclass(eq=False)
class Sequence:
    """One request in the engine. Times are time.perf_counter() seconds."""

    id: int
    prompt_ids: list[int]
    sampling: SamplingConfig
    emit: Callable[[Delta], None]   # called from the engine's thread
    text: TextStream
    sampler: RowSampler
    out_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (s)."""
        n = len(self.out_ids)
        return None if self.t_done is None or n < 2 else (self.t_done - self.t_first) / (n - 1)


class Engine:
    def __init__(self, rt, max_batch: int = 1, max_waiting: int = 64):
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1 (got {max_batch})")
        self.rt, self.max_batch, self.max_waiting = rt, max_batch, max_waiting
        self.model = rt.lm.model
        self.device = rt.lm.device
        self.vocab = rt.lm.config.get_text_config().vocab_size
        self.eos = torch.tensor(sorted(rt.eos_ids), dtype=torch.long, device=self.device)
        self.limit = rt.lm.arch.max_positions
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []                 # the running batch, in cache row order
        self._admitting: list[Sequence] = []            # being prefilled this step
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None          # [B, S] 0/1 over cached columns
        self._pos: torch.Tensor | None = None           # [B] position id of each row's next token
        self._last: torch.Tensor | None = None          # [B] each row's last token (the next step's input)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0                                  # decode steps run
        self.lock = threading.Lock()                    # held while the model runs; readers of the runtime's state
                                                        # (metrics) take it for a consistent snapshot

    # ---- requests ----------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, emit: Callable[[Delta], None]) -> Sequence:
        """Queue a request; raises UserError for a request that can never run and QueueFull when the queue is full.
        Thread-safe."""
        sampling = sampling.checked()
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if self.limit is not None and len(prompt_ids) + sampling.max_new_tokens > self.limit:
            raise UserError(f"a prompt of {len(prompt_ids)} tokens + {sampling.max_new_tokens} new tokens is over "
                            f"the model's limit of {self.limit} positions; shorten the prompt or ask for fewer new "
                            "tokens (max_tokens)")
        if self.rt.tokenizer is None:
            raise UserError(f"{self.rt.lm.ckpt.dir} has no tokenizer; the engine streams text")
        seq = Sequence(next(self._ids), list(prompt_ids), sampling, emit, TextStream(self.rt.tokenizer, sampling.stop),
                       RowSampler(sampling, prompt_ids, self.vocab, self.device), t_submit=time.perf_counter())
        with self._cv:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-waiting "
                                f"{self.max_waiting}); retry later")
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The request's row leaves the batch at the next step (its client went away). Thread-safe."""
        seq.cancelled = True
        with self._cv:
            self._cv.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- the loop ------------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Run steps on a background thread until close()."""
        self._thread = threading.Thread(target=self._loop, name="understudy-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        for seq in list(self._waiting) + self._rows:
            self._finish(seq, "cancelled")
        self._waiting.clear()
        self._reset_batch()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._closed:
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: retire cancelled rows, admit waiting requests, decode one token for every row. Returns
        whether requests remain (running or waiting). A failure of the model fails the requests it was running
        (their emit hears finish_reason "error") and the engine carries on."""
        with self.lock:
            try:
                self._retire({s: ("cancelled", "") for s in self._rows if s.cancelled})
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as exc:   # noqa: BLE001 - reported to every affected request, then serving goes on
                msg = str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
                for seq in self._rows + self._admitting:
                    self._finish(seq, "error", msg)
                self._reset_batch()
            finally:
                self._admitting = []
        with self._cv:
            return bool(self._rows or self._waiting)

    def _admit(self) -> None:
        room = self.max_batch - len(self._rows)
        if room <= 0 or (self._cache is not None and not can_merge(self._cache)):
            return
        with self._cv:
            new = []
            while self._waiting and len(new) < room:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                else:
                    new.append(seq)
        if not new:
            return
        self._admitting = new              # failed with the batch if the prefill fails
        width = max(len(s.prompt_ids) for s in new)
        pad = self.rt.pad_id
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in new], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        stats = self.rt.stats
        stats.phase = "prefill"
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
        finally:
            stats.phase = "decode"
        stats.prompt_tokens += int(mask.sum())
        nxt = select(logits, [s.sampler for s in new])
        last, pos = nxt, mask.sum(-1)
        if self._cache is None:
            self._cache, self._mask, self._pos, self._last = cache, mask, pos, last
        else:
            self._cache, self._mask = merge(self._cache, self._mask, cache, mask)
            self._pos, self._last = torch.cat([self._pos, pos]), torch.cat([self._last, last])
        self._rows.extend(new)
        self._after_tokens(new, nxt, pos)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        b = len(self._rows)
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits = self.model(input_ids=self._last[:, None], attention_mask=mask, position_ids=self._pos[:, None],
                            cache=self._cache, use_cache=True).logits[:, -1]
        self._mask, self._pos = mask, self._pos + 1
        nxt = select(logits, [s.sampler for s in self._rows])
        self._last = nxt
        self.steps += 1
        stats = self.rt.stats
        stats.decode_positions += b
        stats.step_s.append(time.perf_counter() - t0)
        self._after_tokens(self._rows, nxt, self._pos)

    def _after_tokens(self, rows: list[Sequence], nxt: torch.Tensor, pos: torch.Tensor) -> None:
        """Hand each row's new token nxt [len(rows)] to its request (pos [len(rows)]: the position its next token
        would take); rows that are done leave the batch."""
        now = time.perf_counter()
        is_eos = torch.isin(nxt, self.eos).tolist()
        done: dict[Sequence, tuple[str, str]] = {}      # row -> (finish reason, its last text)
        for seq, tok, eos, p in zip(rows, nxt.tolist(), is_eos, pos.tolist()):
            eos = eos and not seq.sampling.ignore_eos
            seq.out_ids.append(tok)
            self.rt.stats.tokens += 1
            if seq.t_first is None:
                seq.t_first = now
                if self.rt.stats.ttft_s == 0.0:
                    self.rt.stats.ttft_s = now - seq.t_submit
            text = "" if eos else seq.text.push(tok)
            if eos or seq.text.stopped:
                done[seq] = ("stop", text)
            elif len(seq.out_ids) >= seq.sampling.max_new_tokens or (self.limit is not None and p >= self.limit):
                done[seq] = ("length", text)
            elif text:
                seq.emit(Delta(text, None, len(seq.prompt_ids), len(seq.out_ids)))
        self._retire(done)

    def _retire(self, seqs: dict[Sequence, tuple[str, str]]) -> None:
        """Rows leave the batch: {row: (finish reason, text produced this step)}."""
        if not seqs:
            return
        for seq, (reason, text) in seqs.items():
            self._finish(seq, reason, text=text)
        keep = [i for i, s in enumerate(self._rows) if s not in seqs]
        if not keep:
            self._reset_batch()
            return
        self._mask = keep_rows(self._cache, self._mask, keep)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._pos, self._last = self._pos[idx], self._last[idx]
        self._rows = [self._rows[i] for i in keep]

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str = "") -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.t_done = reason, time.perf_counter()
        tail = "" if reason in ("cancelled", "error") else text + seq.text.flush()
        seq.emit(Delta(tail, reason, len(seq.prompt_ids), len(seq.out_ids), error, seq.ttft_s, seq.tpot_s,
                       seq.t_done - seq.t_submit))

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None
