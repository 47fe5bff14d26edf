"""Sharding a list of independent work items over a ``torch.distributed`` process group.

Tracing records and evaluating records one at a time (the independent protocol) are
embarrassingly parallel: every item's result depends only on the item and the (unchanged)
model. Each rank takes every ``world``-th item (strided, so ranks get equal shares even when
items grow in cost along the list), and the per-item results are gathered with the object
collectives of ``torch.distributed`` into one list in the original order, which every rank
receives. Statistics (:func:`editkit.stats.second_moment`) instead all-reduce their sums.

:func:`join_torchrun` joins the group ``torchrun`` describes in the environment, for the
command line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from editkit.errors import EditkitError

__all__ = ["gather_in_order", "join_torchrun", "rank_and_world", "shard_indices",
           "torchrun_group"]


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` for ``group=None``.

    Raises:
        EditkitError: a group is given but ``torch.distributed`` is not initialised.
    """
    if group is None:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise EditkitError(
            "group= was given but no torch.distributed process group is initialised; call "
            "torch.distributed.init_process_group(...) first (or launch with torchrun), or "
            "pass group=None to run in one process")
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The item indices of ``rank``: every ``world``-th of ``range(n)``, starting at ``rank``."""
    return list(range(rank, n, world))


def gather_in_order(local: dict[int, Any], n: int, group: Any = None) -> list[Any]:
    """Every rank's ``{index: result}`` merged into a list of ``n`` results in index order,
    returned on every rank (``all_gather_object``; a no-op without a group)."""
    rank, world = rank_and_world(group)
    if world == 1:
        parts: Sequence[dict[int, Any]] = [local]
    else:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, local, group=group)
        parts = gathered
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    missing = sorted(set(range(n)) - set(merged))
    if missing:  # a rank skipped its share: results would silently lack records
        raise EditkitError(f"the ranks returned no result for items {missing[:10]}; every rank "
                           "must process its shard")
    return [merged[i] for i in range(n)]


def join_torchrun(device: str) -> tuple[bool, str]:
    """Join the process group ``torchrun`` describes in the environment when ``WORLD_SIZE`` > 1.

    Returns whether this call created the group (and must destroy it) and the device this
    process computes on (``cuda`` becomes ``cuda:<LOCAL_RANK>``, one GPU per local rank).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    # torchrun sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE: the default env:// init.
    torch.distributed.init_process_group(backend)
    if torch.distributed.get_rank() != 0:
        # Only rank 0 shows progress: transformers' own bars (loading weights) too.
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    return True, device


def leave(created: bool) -> None:
    """Tear down a group :func:`join_torchrun` created, once every rank got here."""
    if created:
        torch.distributed.barrier()  # no rank tears the group down while another talks
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def torchrun_group(device: str) -> Iterator[str]:
    """``with torchrun_group(device) as device:`` — inside torchrun (``WORLD_SIZE`` > 1) the
    block runs in the joined process group on this rank's device, and the group is torn down
    afterwards; elsewhere ``device`` is returned as it is."""
    created, device = join_torchrun(device)
    try:
        yield device
    finally:
        leave(created)


def default_group() -> Any:
    """The default (world) group when one is initialised with more than one rank, else None."""
    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return torch.distributed.group.WORLD
    return None
