"""Collectives for ds: the :class:`Communicator` contract and core's torch implementation.

    from ds.core.comm import init_distributed

    comm = init_distributed(timeout_seconds=600)      # torchrun, Slurm, or one process
    comm.all_reduce(grads, group=mesh.group("dp"))    # raises CollectiveTimeoutError
    ...                                               # naming missing ranks, never hangs
    comm.destroy()

Plugins provide other communicators through ``ds_register_communicators``; core
registers :func:`torch_communicator_factory` as ``"torch"``.
"""

from ds.core.comm.collective_log import CollectiveLog, CollectiveRecord, CollectiveStats
from ds.core.comm.launch import (
    LaunchEnvironment,
    init_distributed,
    torch_communicator_factory,
)
from ds.core.comm.protocol import CollectiveHandle, Communicator
from ds.core.comm.torch_comm import (
    DEFAULT_TIMEOUT_SECONDS,
    TorchCollectiveHandle,
    TorchCommunicator,
)
from ds.core.comm.watchdog import HEARTBEAT_SECONDS, GroupInfo

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "HEARTBEAT_SECONDS",
    "CollectiveHandle",
    "CollectiveLog",
    "CollectiveRecord",
    "CollectiveStats",
    "Communicator",
    "GroupInfo",
    "LaunchEnvironment",
    "TorchCollectiveHandle",
    "TorchCommunicator",
    "init_distributed",
    "torch_communicator_factory",
]
