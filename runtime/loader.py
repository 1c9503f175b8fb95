"""Asynchronous expert loads: one loader thread copies experts from the store into cache slots.

On CPU the thread makes the real copy (mmap/page cache or host memory -> slot); with an emulated `Link` it then
sleeps for what remains of bytes / bandwidth + latency, so transfers overlap compute in wall-clock time as they
would over PCIe. On CUDA the copies are issued on a separate stream and completion is a CUDA event the compute
stream waits on. Demand loads always go before prefetches.

One handoff per batch: `submit` inside `deferred()` only queues the job on the compute thread; leaving the block hands
every queued job to the loader thread at once (`submit_many`), so a layer call's loads cost one wake-up of the loader
thread, not one each. The loader thread drains whatever is queued per wake-up, demand first.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from artifacts.errors import UserError

from runtime.expert_store import ExpertStore
from runtime.link import Link


@dataclass
class Ticket:
    layer: int
    expert: int
    prefetch: bool
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_end: float = 0.0
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    cuda_event: object | None = None
    error: BaseException | None = None
    metered: bool = False             # its duration has been fed to the load-cost meter

    def wait(self) -> None:
        """Block until the copy has landed; a failed copy is raised here, in the caller, as a one-line error."""
        self.done.wait()
        if self.error is not None:
            err = self.error
            why = (err.strerror if isinstance(err, OSError) else None) or (str(err).splitlines() or [type(err).__name__])[0]
            raise UserError(f"loading expert {self.expert} of MoE layer {self.layer} failed ({why}); check the "
                            "checkpoint files and the disk") from err
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)


class Loader:
    def __init__(self, store: ExpertStore, device: torch.device, link: Link | None = None):
        self.store, self.device, self.link = store, device, link
        self._demand: queue.SimpleQueue = queue.SimpleQueue()
        self._prefetch: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Semaphore(0)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._closed = False
        self._held: list[tuple[Ticket, dict[str, torch.Tensor]]] | None = None   # jobs of a deferred() block
        self._thread = threading.Thread(target=self._run, name="understudy-loader", daemon=True)
        self._thread.start()

    def submit(self, layer: int, expert: int, dst: dict[str, torch.Tensor], prefetch: bool = False) -> Ticket:
        """Start loading `expert` of `layer` into the slot tensors `dst` (inside `deferred()`: when the block ends)."""
        ticket = Ticket(layer, expert, prefetch)
        if self._held is not None:
            self._held.append((ticket, dst))
        else:
            self.submit_many([(ticket, dst)])
        return ticket

    def submit_many(self, jobs: Sequence[tuple[Ticket, dict[str, torch.Tensor]]]) -> None:
        """Hand (ticket, dst) jobs to the loader thread in one wake-up; demand jobs in order before any prefetch."""
        if not jobs:
            return
        for job in jobs:
            (self._prefetch if job[0].prefetch else self._demand).put(job)
        self._wake.release()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold `submit`s until the block ends, then hand them over at once. Waiting inside the block
        on a ticket submitted in it would never return: the caller waits only outside it."""
        assert self._held is None, "deferred() blocks do not nest"
        self._held = []
        try:
            yield
        finally:
            jobs, self._held = self._held, None
            self.submit_many(jobs)

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
        ticket.done.set()
