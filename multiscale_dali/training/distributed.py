"""Several processes, one training run: the process group that ``torchrun`` asks for, and its helpers.

``torchrun`` starts one process per GPU (or per CPU worker) and tells each who it is through the
environment: ``RANK`` (global index), ``WORLD_SIZE`` (number of processes), ``LOCAL_RANK`` (index on
this node, which picks the GPU), ``MASTER_ADDR``/``MASTER_PORT`` (where the rendezvous store
listens). :func:`distributed_session` turns that into a frozen :class:`DistributedContext`; without
``WORLD_SIZE`` (or with 1) it is a single process and no process group exists, so every helper below
is a cheap no-op and single-process code pays nothing.

Nothing here is module-level state: the only mutable state is the process group torch.distributed
itself holds, created and destroyed by :func:`distributed_session`.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from multiscale_dali.constants import DEVICE_PATTERN
from multiscale_dali.errors import ConfigError, EXIT_FAILURE, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Collectives wait at most this long for the slowest rank. Finite, so a rank stuck for good (a hung
# filesystem, a dead peer gloo did not notice) ends in an error instead of a silent hang; generous,
# because rank 0 alone may do slow work between two collectives (writing a large checkpoint).
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "MSDALI_DIST_TIMEOUT_S"
PACKAGE_LOGGER = "multiscale_dali"


class DistributedError(UserError, RuntimeError, exit_code=EXIT_FAILURE):
    """The launch environment is inconsistent, or the ranks disagree about something they must share."""


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in the run; the helpers are collectives every rank must call in the same order."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                f"a context of {self.world_size} ranks needs an initialised process group; "
                "build it with distributed_session()"
            )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs at INFO."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (it must live on :attr:`device`); returns it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (an all-reduce MAX)."""
        if not self.is_distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order. Pickled: keep it small and plain (dicts, numbers, str)."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if not self.is_distributed:
            return
        if self.device.type == "cuda":
            # Without device_ids NCCL guesses the GPU from the rank and warns; we know it.
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every rank's ``module``.

        DDP broadcasts buffers at the start of each forward, so after the last training step every rank
        holds statistics updated by its own batch; evaluating with rank 0's makes the distributed
        evaluation match what rank 0 saves in ``best.pt``.
        """
        if not self.is_distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def check_ranks_agree(context: DistributedContext, what: str, value: Any) -> None:
    """Every rank must hold the same ``value`` (plain data); a collective, cheap, run at start-up.

    Ranks that disagree about the data or the checkpoint would shard different lists or resume from
    different places and train on silently wrong data; fail before the first step instead.
    """
    values = context.all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        raise DistributedError(
            f"the {context.world_size} ranks disagree about {what}: "
            + "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            + ". Every node must see the same --data and --out (a shared filesystem) and the same flags."
        )


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(
                f"WORLD_SIZE={environ.get('WORLD_SIZE')} but {name} is not set; launch several processes with "
                "torchrun (e.g. torchrun --nproc-per-node 2 -m multiscale_dali.cli.main train ...)"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout(environ: Mapping[str, str]) -> timedelta:
    raw = environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def resolve_device(device: str, *, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """The training device of this process.

    ``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``cuda`` means this process's
    GPU, ``cuda:LOCAL_RANK``. An explicit ``cuda:N`` is honoured for a single process per node only:
    several processes on one GPU would share its memory and NCCL refuses duplicate GPUs.
    """
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError("device", f"{device!r} is not auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device} was asked for, but CUDA is not available on this machine")
    if device in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    chosen = torch.device(device)
    if local_world_size > 1:
        raise ConfigError(
            "device", f"{device} names one GPU, but this node runs {local_world_size} processes: each takes "
            "cuda:LOCAL_RANK with --device cuda or auto (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return chosen


def _context_from_group(device: str, environ: Mapping[str, str]) -> DistributedContext:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int(environ, "LOCAL_RANK", rank)
    local_world_size = _env_int(environ, "LOCAL_WORLD_SIZE", world_size)
    torch_device = resolve_device(device, local_rank=local_rank, local_world_size=local_world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistributedContext]:
    """The context of this process, with its process group for the duration of the ``with`` block.

    Reads torchrun's environment. ``WORLD_SIZE`` absent or 1: a single process, no process group.
    Otherwise ``init_process_group`` (``env://``, which under torchrun joins the launcher's own store)
    with NCCL when the device is a GPU, after ``torch.cuda.set_device`` so NCCL and
    ``all_gather_object`` use this rank's GPU, and gloo on the CPU; with a finite timeout
    (``MSDALI_DIST_TIMEOUT_S``, default 1800 s). A process group that already exists (the caller made
    it) is used as it is and left alive on exit.
    """
    environ = os.environ
    world_size = _env_int(environ, "WORLD_SIZE", 1)
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if dist.is_available() and dist.is_initialized():
        yield _context_from_group(device, environ)
        return
    if world_size == 1:
        yield DistributedContext(device=resolve_device(device))
        return
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={world_size}, but this PyTorch build has no torch.distributed")
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK")
    local_world_size = _env_int(environ, "LOCAL_WORLD_SIZE", world_size)
    _env_int(environ, "MASTER_PORT")
    if not environ.get("MASTER_ADDR"):
        raise DistributedError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun")
    torch_device = resolve_device(device, local_rank=local_rank, local_world_size=local_world_size)
    timeout = _timeout(environ)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        # device_id binds the group to this GPU: NCCL starts eagerly instead of guessing the device.
        dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=timeout, device_id=torch_device)
        backend = "nccl"
    else:
        if not dist.is_gloo_available():
            raise DistributedError("training on the CPU across processes needs gloo, which this PyTorch lacks")
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
        backend = "gloo"
    context = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)
    if context.is_main:
        log.info("distributed: %d processes, %s backend, collective timeout %.0f s", world_size, backend,
                 timeout.total_seconds())
    try:
        yield context
    finally:
        destroy()


def destroy() -> None:
    """Tear the process group down (no-op when there is none); safe after a peer has already exited."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def quiet_unless_main(context: DistributedContext, logger_name: str = PACKAGE_LOGGER) -> Iterator[None]:
    """INFO logs from rank 0 only; the other ranks keep WARNING and above (N copies of every progress
    line would drown what matters). The logger's level is restored on exit."""
    if context.is_main:
        yield
        return
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(max(logging.WARNING, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)
