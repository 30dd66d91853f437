"""The torchrun-style variables each rank sees, and those Slurm and MPI set, read as torchrun's."""

from __future__ import annotations

import os
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from nbfabric.launcher.machine import is_loopback, loopback_sockets
from nbfabric.launcher.rank_links import RankLinks, rank_links


RANK_VARIABLES = ("RANK", "WORLD_SIZE")  # set in every rank that a launcher started
RUN_KEY_ENV = "NBFABRIC_RUN_KEY"  # the run's key: a rank that has it meets through the keyed store (keyed_store)


@dataclass(frozen=True)
class RankInfo:
    """Who a process is in its run, and (in a rank nbfabric started) its links to the launcher."""

    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    links: RankLinks | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_environment(cls) -> RankInfo:
        """This process's place as torchrun's variables give it, or Slurm's in a task of `srun`, or
        MPI's under `mpirun` (which then become torchrun's); one process of its own without them."""
        env = os.environ
        adopt_launcher_variables()
        if not started_by_launcher():
            return cls(links=rank_links())
        return cls(
            global_rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            node_rank=int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))),
            world_size=int(env["WORLD_SIZE"]),
            links=rank_links(),
        )


def started_by_launcher() -> bool:
    """Whether a launcher (nbfabric, torchrun, srun, mpirun ...) started this process as one rank of a run."""
    return all(name in os.environ for name in RANK_VARIABLES) or in_slurm_step() or in_mpi_job()


def adopt_launcher_variables() -> None:
    """Where Slurm or MPI started this process and torchrun's variables are not set, set them from theirs."""
    env = os.environ
    if any(name in env for name in RANK_VARIABLES):
        return
    if in_slurm_step():
        env.update(slurm_rank_environment(env))
    elif in_mpi_job():
        env.update(mpi_rank_environment(env))


def launched_world() -> tuple[int, int] | None:
    """(ranks on this node, nodes) of the run that a launcher started this process in; None if none did."""
    adopt_launcher_variables()
    if not all(name in os.environ for name in RANK_VARIABLES):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return per_node, max(1, world_size // max(per_node, 1))


_MPI_VARIABLES = {  # torchrun's name -> Open MPI's, MPICH's (Hydra)
    "RANK": ("OMPI_COMM_WORLD_RANK", "PMI_RANK"),
    "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
    "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
    "LOCAL_WORLD_SIZE": ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"),
}


def in_mpi_job() -> bool:
    """Whether this process is one of several ranks started by `mpirun`/`mpiexec` (Open MPI or MPICH)."""
    return int(_mpi_value(os.environ, "WORLD_SIZE") or 1) > 1


def _mpi_value(env: Mapping[str, str], name: str) -> str | None:
    return next((env[source] for source in _MPI_VARIABLES[name] if source in env), None)


def mpi_rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables from MPI's. The rendezvous is on MASTER_ADDR (this machine when every rank
    runs here) at MASTER_PORT, else a port derived from the job's id, the same in every rank."""
    values = {name: _mpi_value(env, name) for name in _MPI_VARIABLES}
    world_size = int(values["WORLD_SIZE"])
    per_node = int(values["LOCAL_WORLD_SIZE"] or world_size)
    if "MASTER_ADDR" not in env and per_node != world_size:
        raise RuntimeError(
            f"mpirun started {world_size} ranks on several nodes; set MASTER_ADDR to the address of the node of "
            "rank 0 (mpirun -x MASTER_ADDR=...) so that they can meet."
        )
    job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or env.get("PMI_ID", "") + env.get("PMI_FD", "")
    return {
        "RANK": values["RANK"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": values["LOCAL_RANK"] or "0",
        "LOCAL_WORLD_SIZE": str(per_node),
        "NODE_RANK": str(int(values["RANK"]) // per_node),
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT", str(15000 + zlib.crc32(job.encode()) % 10000)),
    }


def in_slurm_step() -> bool:
    """Whether this process is one of several tasks of an `srun` step (not a lone task, nor a
    batch script itself)."""
    env = os.environ
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1


def slurm_rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables from Slurm's, as Lightning's SLURM environment reads them: the first
    node of the step hosts the rendezvous, on a port derived from the job id unless MASTER_PORT is set."""
    nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    world_size = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": world_size,
        "LOCAL_WORLD_SIZE": _tasks_here(env),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "GROUP_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR", first_node(nodes)),
        "MASTER_PORT": env.get("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")[-4:] or 0))),
    }


def _tasks_here(env: Mapping[str, str]) -> str:
    """This node's task count, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of 3 nodes, then 1)."""
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        count, _, repeat = part.partition("(x")
        counts += [count] * int(repeat.rstrip(")") or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: "n[3-5,9],m1" -> "n3"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist)
    return match.group(1) + (match.group(2) or "") if match else nodelist


@contextmanager
def preserved_environment() -> Iterator[None]:
    """Undo what the block does to os.environ (some imports set variables as they load), touching
    only the variables it changed: other threads may use the environment meanwhile."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in os.environ.keys() - saved.keys():
            os.environ.pop(name, None)
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def rank_environment(
    *,
    local_rank: int,
    local_world_size: int,
    node_rank: int,
    num_nodes: int,
    main_address: str,
    main_port: int,
    threads: int | None,
    run_key: str | None = None,
) -> dict[str, str]:
    """Variables torchrun would set for this rank, and the run's key (RUN_KEY_ENV) where one is given."""
    env = {
        "MASTER_ADDR": main_address,
        "MASTER_PORT": str(main_port),
        "RANK": str(node_rank * local_world_size + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(local_world_size * num_nodes),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "NODE_RANK": str(node_rank),
        "GROUP_RANK": str(node_rank),
        "TORCHELASTIC_RUN_ID": "nbfabric",
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if num_nodes == 1 or is_loopback(main_address):
        env.update(loopback_sockets())
    if run_key is not None:
        env[RUN_KEY_ENV] = run_key
    return env
