"""Start torch.distributed from whatever launched this process.

ds never ships a launcher: torchrun (one node or many, elastic) or a scheduler such as
Slurm starts the processes, and a plain ``python train.py`` runs as world size 1. This
module reads which of those happened and initialises the default process group:

* torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``):
  ``env://`` rendezvous, which also honours torchrun's agent store;
* ``srun`` without torchrun (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``):
  TCP rendezvous at ``MASTER_ADDR``, ``MASTER_PORT`` (default 29500);
* nothing: one process with gloo (or the accelerator's backend) on an in-memory store,
  so single-process code takes the same paths as distributed code.

On an accelerator the backend is the device's default (NCCL for CUDA and ROCm) and the
process uses device ``LOCAL_RANK``; otherwise gloo on CPU. An already initialised
default group is reused and left for its creator to destroy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from ds.core.comm.torch_comm import DEFAULT_TIMEOUT_SECONDS, TorchCommunicator
from ds.core.errors import DsError

PROCESS_GROUP_TIMEOUT_MARGIN_SECONDS = 60.0
"""Added to the collective timeout for torch's own timeouts (rendezvous, gloo's internal
one, NCCL's watchdog, which kills the process): they must fire after ds's watchdog so the
error that names the missing ranks is the one users see, and a short collective timeout
must still leave slow-starting ranks time to join."""

SLURM_DEFAULT_MASTER_PORT = "29500"


class CommunicatorSettings(Protocol):
    """The fields of ``ds.core.config.CommunicatorConfig`` this module reads."""

    timeout_seconds: float
    log_collectives: bool


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    init_method: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnvironment | None:
        """Read torchrun's or Slurm's variables; None when no launcher set any."""
        if "RANK" in environ or "WORLD_SIZE" in environ:
            missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in environ]
            if missing:
                raise DsError(
                    f"the environment sets RANK or WORLD_SIZE but not {', '.join(missing)}. Start "
                    "the job with torchrun (which sets them all), or unset RANK and WORLD_SIZE "
                    "to run as a single process."
                )
            return cls(
                rank=_int_variable(environ, "RANK"),
                world_size=_int_variable(environ, "WORLD_SIZE"),
                local_rank=_int_variable(environ, "LOCAL_RANK", default=0),
                init_method="env://",
            )
        if _int_variable(environ, "SLURM_NTASKS", default=1) > 1:
            address = environ.get("MASTER_ADDR")
            if address is None:
                raise DsError(
                    "running under srun with several tasks but MASTER_ADDR is not set. Add "
                    "`export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | "
                    "head -n 1)` to the batch script, or launch with torchrun."
                )
            port = environ.get("MASTER_PORT", SLURM_DEFAULT_MASTER_PORT)
            return cls(
                rank=_int_variable(environ, "SLURM_PROCID"),
                world_size=_int_variable(environ, "SLURM_NTASKS"),
                local_rank=_int_variable(environ, "SLURM_LOCALID", default=0),
                init_method=f"tcp://{address}:{port}",
            )
        return None


def _int_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise DsError(f"environment variable {name} is not set; the launcher should set it.")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DsError(f"environment variable {name}={raw!r} is not an integer.") from None


def init_distributed(
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    log_collectives: bool = False,
    backend: str | None = None,
) -> TorchCommunicator:
    """Initialise torch.distributed for this process and return its communicator.

    ``backend`` forces a torch backend (``"gloo"`` to keep an accelerator machine's
    collectives on CPU, say); by default it is the accelerator's (NCCL for CUDA) or gloo.
    ``timeout_seconds`` bounds every collective; ``log_collectives`` records them. Call
    :meth:`TorchCommunicator.destroy` at the end; a process that exits without it does
    not hang.
    """
    if not dist.is_available():
        raise DsError("this torch build has no torch.distributed; install a standard torch wheel.")
    if dist.is_initialized():
        device = _select_device(dist.get_backend(), _int_variable(os.environ, "LOCAL_RANK", default=0))
        return TorchCommunicator(
            device=device, timeout_seconds=timeout_seconds, log_collectives=log_collectives
        )
    launch = LaunchEnvironment.from_environ(os.environ)
    device = _select_device(backend, launch.local_rank if launch else 0)
    backend = backend or dist.get_default_backend_for_device(device)
    timeout = timedelta(seconds=timeout_seconds + PROCESS_GROUP_TIMEOUT_MARGIN_SECONDS)
    # Binding the device creates NCCL communicators eagerly, which lets DeviceMesh split
    # groups instead of creating each from scratch.
    device_id = None if device.type == "cpu" else device
    if launch is None:
        store = dist.HashStore()  # type: ignore[attr-defined]  # torch exports it conditionally
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(
            backend,
            init_method=launch.init_method,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=device_id,
        )
    return TorchCommunicator(
        device=device,
        timeout_seconds=timeout_seconds,
        log_collectives=log_collectives,
        owns_process_group=True,
    )


def _select_device(backend: str | None, local_rank: int) -> torch.device:
    """The accelerator ``LOCAL_RANK`` when ``backend`` is (or defaults to) its backend, else CPU."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:
        return torch.device("cpu")
    device = torch.device(accelerator.type, local_rank)
    accelerator_backend = dist.get_default_backend_for_device(device)
    # A default group may name several backends, e.g. "cpu:gloo,cuda:nccl".
    if backend is not None and accelerator_backend not in {b.split(":")[-1] for b in backend.split(",")}:
        return torch.device("cpu")
    count = torch.accelerator.device_count()
    if local_rank >= count:
        raise DsError(
            f"LOCAL_RANK is {local_rank} but only {count} {accelerator.type} device(s) are visible; "
            f"start at most {count} processes per node (torchrun --nproc-per-node {count})."
        )
    torch.accelerator.set_device_index(local_rank)
    return device


def torch_communicator_factory(config: CommunicatorSettings | None = None) -> TorchCommunicator:
    """The ``"torch"`` communicator for ``ds_register_communicators``.

    ``config`` is the run's ``communicator`` section (``CommunicatorConfig``); None uses
    the defaults. Initialises torch.distributed as :func:`init_distributed` does.
    """
    if config is None:
        return init_distributed()
    return init_distributed(timeout_seconds=config.timeout_seconds, log_collectives=config.log_collectives)


__all__ = [
    "PROCESS_GROUP_TIMEOUT_MARGIN_SECONDS",
    "CommunicatorSettings",
    "LaunchEnvironment",
    "init_distributed",
    "torch_communicator_factory",
]
