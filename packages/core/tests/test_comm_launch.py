"""Reading the launcher's environment: torchrun, srun, or none at all."""

from __future__ import annotations

import pytest

from ds.core.comm import LaunchEnvironment
from ds.core.errors import DsError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "node7"}


def test_torchrun_environment_uses_env_rendezvous() -> None:
    assert LaunchEnvironment.from_environ(TORCHRUN) == LaunchEnvironment(3, 8, 1, "env://")
    # torchrun inside an srun allocation: torchrun's variables win
    assert LaunchEnvironment.from_environ({**SRUN, **TORCHRUN}) == LaunchEnvironment(3, 8, 1, "env://")


def test_srun_environment_uses_tcp_rendezvous_at_master_addr() -> None:
    assert LaunchEnvironment.from_environ(SRUN) == LaunchEnvironment(5, 16, 1, "tcp://node7:29500")
    with_port = {**SRUN, "MASTER_PORT": "1234"}
    assert LaunchEnvironment.from_environ(with_port) == LaunchEnvironment(5, 16, 1, "tcp://node7:1234")


def test_no_launcher_means_a_single_process() -> None:
    assert LaunchEnvironment.from_environ({}) is None
    assert LaunchEnvironment.from_environ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # salloc shell


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "not MASTER_ADDR, MASTER_PORT. Start the job with torchrun"),
        ({**TORCHRUN, "RANK": "three"}, "RANK='three' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "MASTER_ADDR is not set.*scontrol show hostnames"),
    ],
)
def test_incomplete_environments_say_what_to_set(environ: dict[str, str], message: str) -> None:
    with pytest.raises(DsError, match=message):
        LaunchEnvironment.from_environ(environ)
