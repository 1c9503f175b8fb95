"""Asynchronous expert loads: one loader thread copies experts from the store into cache slots.

On CPU the thread makes the real copy (mmap/page cache or host memory -> slot); with an emulated `Link` it then
sleeps for what remains of bytes / bandwidth + latency, so transfers overlap compute in wall-clock time as they
would over PCIe. On CUDA the copies are issued on a separate stream and completion is a CUDA event the compute
stream waits on. Demand loads always go before prefetches.

One handoff per batch: `submit_many` hands a layer call's run of loads to the loader thread at once, so they cost one
wake-up of the loader thread, not one each. The loader thread drains whatever is queued per wake-up, demand first.

Inline copies: on the CPU with no emulated link a load is a memcpy from the page cache or host memory, and for small
experts the hand-off costs more than the copy. The loader thread's Python (queue, event, timing) contends with the
compute thread for the GIL, which every torch op of the compute thread releases and takes again; on the
random-weight Qwen3-30B-A3B shape of benchmarks/overhead.py (12 KiB experts) that contention, not the copies, made
most of lru's time over resident's (`OffloadExecutor`'s waits and the expert function both slowed). So experts of at
most `INLINE_MAX_BYTES` are copied on the calling thread when they are submitted (the threshold is a judgement, not
a measured break-even: the benchmark's experts are 12 KiB, a real model's MBs). Larger experts (a real model's are
MBs: 9 MiB for Qwen3-30B-A3B in bf16), an emulated link and CUDA keep the thread, whose copies overlap compute.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from artifacts.errors import UserError

from runtime.expert_store import ExpertStore
from runtime.link import Link

INLINE_MAX_BYTES = 1 << 20   # experts up to this size are copied inline (CPU, no link); see the module doc


@dataclass(slots=True, eq=False)
class Ticket:
    layer: int
    expert: int
    prefetch: bool
    t_start: float = 0.0
    t_end: float = 0.0
    nbytes: int = 0
    done: threading.Event | None = None   # set by the loader thread when the copy has landed; None: copied inline
    cuda_event: object | None = None
    error: BaseException | None = None

    @property
    def landed(self) -> bool:
        return self.done is None or self.done.is_set()

    def wait(self) -> None:
        """Block until the copy has landed; a failed copy is raised here, in the caller, as a one-line error."""
        if self.done is not None:
            self.done.wait()
        if self.error is not None:
            raise load_error(self.layer, self.expert, self.error) from self.error
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)


Job = tuple[int, int, dict[str, torch.Tensor], bool]      # (layer, expert, slot tensors to fill, prefetch)


def load_error(layer: int, expert: int, err: BaseException) -> UserError:
    """The one-line error of a failed copy."""
    why = (err.strerror if isinstance(err, OSError) else None) or (str(err).splitlines() or [type(err).__name__])[0]
    return UserError(f"loading expert {expert} of MoE layer {layer} failed ({why}); check the checkpoint files and "
                     "the disk")


class Loader:
    """Copies experts into cache slots: on the loader thread, or inline on the calling thread where a thread hand-off
    costs more than the copy (see `inline`)."""

    def __init__(self, store: ExpertStore, device: torch.device, link: Link | None = None,
                 inline_max_bytes: int = INLINE_MAX_BYTES):
        self.store, self.device, self.link = store, device, link
        # copy on the calling thread: on the CPU with no emulated link, for experts of at most inline_max_bytes
        self.inline = device.type == "cpu" and link is None and store.expert_bytes <= inline_max_bytes
        self._demand: queue.SimpleQueue = queue.SimpleQueue()
        self._prefetch: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Semaphore(0)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="understudy-loader", daemon=True)
        self._thread.start()

    def submit_many(self, jobs: Sequence[Job]) -> list[Ticket]:
        """Start loading each (layer, expert, dst, prefetch) job; returns their tickets in order. Inline: each copy
        is made now, in order. Else the jobs go to the loader thread in one wake-up, demand ones in order before any
        prefetch."""
        tickets = [Ticket(layer, e, prefetch) for layer, e, _, prefetch in jobs]
        if self.inline:
            for t, job in zip(tickets, jobs):
                self._copy(t, job[2])
            return tickets
        for t, job in zip(tickets, jobs):
            t.done = threading.Event()
            (self._prefetch if t.prefetch else self._demand).put((t, job[2]))
        if tickets:
            self._wake.release()
        return tickets

    def copy_inline(self, layer: int, expert: int, dst: dict[str, torch.Tensor]) -> float:
        """An inline load (`inline`) without a ticket: the copy into dst now, on this thread; returns its seconds. A
        failed copy raises its one-line error."""
        return self.copy_inline_many(layer, ((expert, dst),))

    def copy_inline_many(self, layer: int, loads: Sequence[tuple[int, dict[str, torch.Tensor]]]) -> float:
        """`copy_inline` of each (expert, dst) of one layer, in order, timed as one span; returns its seconds."""
        copy, e = self.store.copy_into, None
        t0 = time.perf_counter()
        try:
            for e, dst in loads:
                copy(layer, e, dst)
        except Exception as exc:
            raise load_error(layer, e, exc) from exc
        return time.perf_counter() - t0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake.release()
            self._thread.join(timeout=10)

    def _next(self):
        for q in (self._demand, self._prefetch):
            try:
                return q.get_nowait()
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            while not self._closed:
                job = self._next()
                if job is None:
                    break
                self._copy(*job)
            if self._closed:
                return

    def _copy(self, ticket: Ticket, dst: dict[str, torch.Tensor]) -> None:
        """One job: the copy (on the loader stream on CUDA), the emulated link's remaining time, the ticket's times."""
        ticket.t_start = time.perf_counter()
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    ticket.nbytes = self.store.copy_into(ticket.layer, ticket.expert, dst, non_blocking=True)
                    ticket.cuda_event = torch.cuda.Event()
                    ticket.cuda_event.record(self._stream)
            else:
                ticket.nbytes = self.store.copy_into(ticket.layer, ticket.expert, dst)
            if self.link is not None:
                remaining = ticket.t_start + self.link.seconds(ticket.nbytes) - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)
        except BaseException as exc:  # surfaced to the waiting compute thread by Ticket.wait
            ticket.error = exc
        ticket.t_end = time.perf_counter()
        if ticket.done is not None:
            ticket.done.set()
