"""Profiling sharded over processes: `torchrun --nproc_per_node W -m profiler.cli MODEL --calib DATA -o OUT`.

Who measures what (W processes, rank r), chosen so that the reduced profile is the single-process run's:
- The observation pass (trace, routing counts, importance, similarity) is sharded by calibration tokens, in whole
  batches of the single run: with nb = ceil(N / B) batches of B windows (batch b = windows bB .. bB + B - 1), rank r
  takes batches floor(r nb / W) .. floor((r + 1) nb / W) - 1. Every forward pass is one the single run makes, on the
  same windows and probe tokens, so every per-batch contribution is bit for bit the same: counts and the trace
  (concatenated in rank order) are equal, float64 sums differ only in the order the batches are added.
- The measurement passes (loss sensitivity: one pass per (option, cut); quantization: the passes of one MoE layer)
  are sharded by pass: unit u (in the single run's order) is run by rank u mod W over all the measurement tokens,
  after the exact pass, which every rank with a unit runs itself. Each entry of the result comes from the rank that
  ran it, so it is bit for bit the single run's. Tokens would not shard these: --quant-tokens 1024 at --seq-len 256
  is one batch, and every pass streams every routed expert however few its tokens.
- The quantization classes come from the importance summed over all ranks, so every rank measures with the classes
  of the single run (not its own shard's, as separately profiled and merged shards do).
Only rank 0 builds and writes the profile. A failure on any rank reaches every rank at the next `agree`, so all exit
non-zero and nothing is written.

Collectives: gloo carries them (host objects: numpy sums and the trace, a few per run); with --device cuda the
process group also registers NCCL for device tensors ("cpu:gloo,cuda:nccl"), which no step sends today, and each
rank computes on GPU LOCAL_RANK.
"""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

from artifacts.errors import UserError

T = TypeVar("T")


class ShardFailed(UserError):
    """Raised on every rank when a step failed on any rank; rank 0's names every failure, the others are `quiet`."""

    def __init__(self, message: str, quiet: bool):
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Shards:
    """This process's place among the processes profiling one model; rank 0 of 1 is a plain run."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def windows(self, windows: int, batch_size: int) -> tuple[int, int]:
        """[lo, hi): this rank's calibration windows for the observation pass (module docstring)."""
        w, batches = self.world_size, -(-windows // batch_size)
        if batches < w:
            raise UserError(f"{windows} calibration windows make {batches} batches of --batch-size {batch_size}, fewer "
                            f"than the {w} processes; give more --samples, a smaller --batch-size or fewer processes")
        lo, hi = self.rank * batches // w, (self.rank + 1) * batches // w
        return lo * batch_size, min(hi * batch_size, windows)

    def owns(self, unit: int) -> bool:
        """Whether this rank runs measurement unit `unit` (units in the single run's order)."""
        return self.owner(unit) == self.rank

    def owner(self, unit: int) -> int:
        return unit % self.world_size

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` here, then hear from every rank: its result if every rank succeeded, else ShardFailed on all."""
        if self.world_size == 1:
            return step()
        import torch.distributed as dist

        try:
            result, failure = step(), None
        except UserError as exc:
            result, failure = None, str(exc)
        except Exception as exc:  # a bug on this rank: its traceback here, the one line on rank 0
            traceback.print_exc()
            result, failure = None, f"{type(exc).__name__}: {exc}"
        failures: list[str | None] = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        failed = {r: f for r, f in enumerate(failures) if f is not None}
        if failed:
            if len(set(failed.values())) == 1 and len(failed) == self.world_size:
                message = next(iter(failed.values()))       # the same mistake everywhere: said once, as one run says it
            else:
                message = "; ".join(f"rank {r} of {self.world_size}: {f}" for r, f in failed.items())
            raise ShardFailed(f"{message} (nothing written)" if len(failed) < self.world_size else message,
                              quiet=not self.main)
        return result

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (call only where every rank gets to: after `agree`)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out


@contextmanager
def torchrun_shards(device: str, timeout: timedelta = timedelta(hours=24)) -> Iterator[Shards]:
    """The process group torchrun set up in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or a
    plain run's Shards() without it (or with WORLD_SIZE 1). `timeout` bounds a wait in a collective: ranks wait for
    the slowest at every step (up to one batch or one measurement unit apart); a rank that dies is torchrun's to
    stop the others."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield Shards()
        return
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise UserError(f"WORLD_SIZE is {world} but RANK is not set; launch moe-profile with torchrun, or unset "
                        "WORLD_SIZE for a single process")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); run torchrun "
                            f"with --nproc_per_node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"cannot join the torch.distributed process group ({str(exc).splitlines()[0]}); launch "
                        "moe-profile with torchrun, or unset WORLD_SIZE for a single process") from None
    try:
        yield Shards(rank, world)
    finally:
        dist.destroy_process_group()
