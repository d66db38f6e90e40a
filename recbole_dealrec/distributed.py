"""Many processes with ``torch.distributed`` (``torchrun``): gloo on CPU, NCCL on GPU.

``torchrun --nproc_per_node=N -m recbole_dealrec ...`` sets ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``; the plugin
then joins the process group itself (RecBole's own multi-process path is NCCL-only). Sharded: the influence
scores (mean gradient and every HVP all-reduced, per-user scores computed on each rank's share of the users and
gathered), the effort, GraNd and EL2N scores (users split across ranks); data-parallel: the surrogate's training
and the generative backends' fine-tuning (every rank walks the same seeded global batches, trains on its share
of each with its loss weighted by its share of the loss terms, gradients all-reduced before each step); sharded
and merged exactly: the backends' validation loss and test evaluation. What else is cached (other signals,
semantic IDs) is computed by rank 0 while the others wait, then read from the cache; rank 0 alone writes caches,
selections, checkpoints and reports. Every collective has the group's timeout (``distributed_timeout``), so a
rank that dies makes the others fail instead of hang (and torchrun stops the group when a worker exits with an
error).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from logging import getLogger
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(timeout_s: float = 1800.0, device: str = "cpu") -> bool:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); ``False`` when single-process."""
    if env_world_size() <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        getLogger().info(f"[Distributed] rank {dist.get_rank()} of {dist.get_world_size()} ({backend})")
    return True


_solo = False  # inside solo(): this rank works alone, every helper acts as in a single process
_collective_seconds = 0.0  # wall time this process spent in the helpers' collectives (waiting included)


def collective_seconds() -> float:
    """Seconds this process has spent in collectives so far (sending, receiving and waiting for slower ranks)."""
    return _collective_seconds


@contextlib.contextmanager
def _timed() -> Iterator[None]:
    global _collective_seconds
    start = time.perf_counter()
    try:
        yield
    finally:
        _collective_seconds += time.perf_counter() - start


def shutdown() -> None:
    """Leave the process group (end of a torchrun process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several (and not inside :func:`solo`)."""
    return not _solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Work rank 0 does alone while the others wait at a barrier (a cached computation): no collectives in it."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        with _timed():
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it computes and caches), then the others run it (they read the cache)."""
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    with _timed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; the same on every rank)."""
    if not active():
        return tensor
    out = tensor.detach().clone()
    with _timed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(value: Any) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list = [None] * world_size()
    with _timed():
        dist.all_gather_object(out, value)
    return out


def shard(items: Sequence) -> Sequence:
    """This rank's contiguous share of ``items`` (shares differ by at most one; concatenated in rank order they
    are ``items``)."""
    if not active():
        return items
    bounds = np.linspace(0, len(items), world_size() + 1).round().astype(int)
    return items[bounds[rank()]: bounds[rank() + 1]]


# ---- reductions that do not depend on the number of processes
#
# A float sum depends on its order, and Algorithm 2's bin edges turn 1e-7 differences of the scores into other
# users. So every reduction over users or rows that feeds a selection is cut into *fixed blocks* (a function of
# the data alone, never of the number of processes): each rank computes whole blocks, and the block results are
# combined in block order. One process computes every block itself and combines them the same way, so the result
# is bit for bit the same for 1, 2, 3, ... processes (ranks beyond the number of blocks have nothing to do).

REDUCTION_BLOCKS = 16  # blocks a summed pass (mean gradient, HVP) is cut into: memory is this x the parameters


def fixed_blocks(n_items: int, n_blocks: int) -> list[range]:
    """``n_items`` consecutive items cut into at most ``n_blocks`` non-empty runs of near-equal length."""
    bounds = np.linspace(0, n_items, min(n_blocks, n_items) + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def owned_blocks(n_blocks: int) -> range:
    """The block indices this rank computes: a contiguous run (all of them in one process)."""
    bounds = np.linspace(0, n_blocks, world_size() + 1).round().astype(int)
    return range(int(bounds[rank()]), int(bounds[rank() + 1]))


def ordered_sum(n_items: int, partial_sum: Callable[[range], torch.Tensor], like: torch.Tensor,
                n_blocks: int = REDUCTION_BLOCKS) -> torch.Tensor:
    """The sum over ``n_items`` items, as ``partial_sum(block)`` (a tensor shaped like ``like``) of each fixed
    block of item indices (:func:`fixed_blocks`), added from zero in block order. The same bits whatever the
    number of processes: each rank fills its blocks' rows of a ``[blocks, *like.shape]`` tensor, zeros elsewhere,
    and the all-reduced rows are exact (``x + 0 = x``)."""
    blocks = fixed_blocks(n_items, n_blocks)
    if active():
        stacked = torch.zeros((len(blocks), *like.shape), dtype=like.dtype)
        for b in owned_blocks(len(blocks)):
            stacked[b] = partial_sum(blocks[b])
        parts = iter(all_reduce_sum(stacked))
    else:
        parts = (partial_sum(block) for block in blocks)
    total = torch.zeros_like(like)
    for value in parts:
        total = total + value
    return total


def map_blocks(items: Sequence, compute: Callable[[Sequence], torch.Tensor], block_size: int,
               progress: Optional[str] = None) -> torch.Tensor:
    """``compute`` of each fixed block of ``block_size`` consecutive items, concatenated in item order. Each rank
    computes a contiguous run of whole blocks and the results (tensors with one leading row per item) are
    gathered; one process computes every block itself. A block's batch is the same whatever the number of
    processes, so the rows are too, bit for bit (a batch of other rows, or padded to another length, could round
    otherwise). ``progress``: a progress bar over this rank's blocks, with that description."""
    if block_size < 1:
        raise ValueError(f"map_blocks: block_size must be >= 1, got {block_size}")
    starts = range(0, len(items), block_size)
    mine = owned_blocks(len(starts))
    local = [compute(items[starts[b]: starts[b] + block_size])
             for b in tqdm(mine, desc=progress, ncols=100, disable=progress is None)]
    parts = [part for rank_parts in gather_objects(local) for part in rank_parts]
    return torch.cat(parts)


def shard_strided(rows: np.ndarray) -> np.ndarray:
    """This rank's rows ``rows[rank::world_size]``: an ordered ``rows`` (BIGRec's prompts by length) gives every
    rank a like share of short and long ones. :func:`unshard_strided` puts the ranks' results back in order."""
    return rows[rank()::world_size()] if active() else rows


def unshard_strided(parts: Sequence):
    """The inverse of :func:`shard_strided`: every rank's per-row results (tensors or arrays, rows first, in rank
    order) interleaved back into the order of the unsharded rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    total = sum(len(p) for p in parts)
    if isinstance(first, torch.Tensor):
        out = first.new_empty((total, *first.shape[1:]))
    else:
        out = np.empty((total, *np.shape(first)[1:]), dtype=np.asarray(first).dtype)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


# ---- data-parallel training: every rank walks the same seeded global batches and trains on its share of each


def batch_share(batch):
    """This rank's contiguous share of the rows of ``batch`` (a RecBole ``Interaction``; itself when alone)."""
    if not active():
        return batch
    return batch[torch.from_numpy(np.asarray(shard(np.arange(len(batch)))))]


def share_of_total(count: int) -> float:
    """``count / (sum of count over ranks)``: the weight of a rank's loss, a mean over its ``count`` loss terms, in
    the mean over the global batch's terms (so the sum over ranks of weighted losses is the global batch's loss)."""
    total = float(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)))
    return count / total if total else 0.0


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum each parameter's ``.grad`` over the ranks in one flat all-reduce (as DDP's buckets do); a missing
    gradient counts as zeros."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
