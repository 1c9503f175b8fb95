"""Asynchronous expert loads: one loader thread copies experts from the store into cache slots.

On CPU the thread makes the real copy (mmap/page cache or host memory -> slot); with an emulated `Link` it then
sleeps for what remains of bytes / bandwidth + latency, so transfers overlap compute in wall-clock time as they
would over PCIe. On CUDA the copies are issued on a separate stream and completion is a CUDA event the compute
stream waits on. Demand loads always go before prefetches.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

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
        self._thread = threading.Thread(target=self._run, name="understudy-loader", daemon=True)
        self._thread.start()

    def submit(self, layer: int, expert: int, dst: dict[str, torch.Tensor], prefetch: bool = False) -> Ticket:
        ticket = Ticket(layer, expert, prefetch)
        (self._prefetch if prefetch else self._demand).put((ticket, dst))
        self._wake.release()
        return ticket

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
            if self._closed:
                return
            job = self._next()
            if job is None:
                continue
            ticket, dst = job
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
