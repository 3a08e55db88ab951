"""Ranks of a dataset evaluation: which shard this process takes, torchrun's process group, and the wait for the
other ranks' records (file polling, no collective: adaptive solves make ranks finish far apart)."""

from __future__ import annotations

import os
import time

import torch

from .records import read_all


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world_size, whether a process group of exactly these ranks is available for a final barrier)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        if initialised:
            return dist.get_rank(), dist.get_world_size(), True
        return 0, 1, False
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if int(world_size) != world_size or world_size < 1 or int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"need integers 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    same = initialised and (dist.get_rank(), dist.get_world_size()) == (rank, world_size)
    return int(rank), int(world_size), same


def maybe_init_distributed() -> bool:
    """Initialise the process group from torchrun's environment (env://) if needed; True if we did."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def is_secondary_rank() -> bool:
    """True in a process group's ranks other than 0."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def wait_complete(
    out_dir: str, num_samples: int, repeats: int, world_size: int, timeout: float | None, poll_interval: float
) -> dict[tuple[int, int], dict]:
    """Every record of the run, once the record files in ``out_dir`` hold all num_samples x repeats pairs."""
    total = num_samples * repeats
    start, delay = time.monotonic(), 0.02
    while True:
        done = read_all(out_dir, num_samples, repeats)
        if len(done) == total:
            return done
        if world_size == 1:
            raise RuntimeError(
                f"{total - len(done)} of {total} records are missing in {out_dir!r} after the "
                "evaluation; was the directory modified by another process during the run?"
            )
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(
                f"waited {timeout} s for other ranks: {total - len(done)} of {total} records still "
                f"missing in {out_dir!r}"
            )
        time.sleep(delay)
        delay = min(2 * delay, poll_interval)
