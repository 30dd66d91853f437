"""The engines of a rank pool: ranks that outlive a run, as ipyparallel engines started on this
machine or by ipyparallel's Slurm, MPI or SSH launchers, made one process group."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nbfabric.config import RunConfig
from nbfabric.pool import engine_side, slurm_job, watchdog
from nbfabric.tracebacks import ShortInIPython
from nbfabric.launcher import interrupts_deferred
from nbfabric.launcher.environment import rank_environment
from nbfabric.launcher.keyed_store import new_run_key
from nbfabric.launcher.machine import is_loopback

ENGINE_KINDS = ("local", "slurm", "mpi", "ssh")
START_TIMEOUT = 300.0  # seconds to wait for every engine to register (a Slurm job may queue)
JOB_CHECK = 1.0  # seconds between two looks at a running pool's Slurm job
# The controller drops an engine that missed this many heartbeats of this period (ms); engines on
# this machine are also watched by their pid, at once.
HEARTBEAT = ["--HeartMonitor.period=1000", "--HeartMonitor.max_heartmonitor_misses=10"]


class PoolError(ShortInIPython, RuntimeError):
    """The pool cannot be started, used, or is broken; says what to do."""


@dataclass(frozen=True)
class PoolRank:
    """One rank of the pool: where it runs and which engine it is."""

    rank: int
    local_rank: int
    node_rank: int
    node: str
    address: str
    pid: int
    engine: int

    @property
    def here(self) -> bool:
        """Whether the rank's engine runs on this machine (so its process can be watched)."""
        return self.node == socket.gethostname() or self.address.startswith("127.")


class EngineCluster:
    """The engines of a rank pool, one per rank, made one process group: started here (``devices=2``),
    by Slurm (``engines="slurm"``, ``partition``, ``time``), by MPI or SSH (``engines="mpi"`` or
    ``"ssh"``, ``hosts=["a", "b"]``: ``devices`` engines on each host, one node per host), or found
    (``attach``); watched, interrupted, regrouped and stopped. `RankPool` runs functions on them.

    A watchdog process ends the pool when the kernel that holds it is gone; ``detach=True`` keeps
    it then, for a later ``attach()``, until no kernel has held it for ``idle_timeout`` seconds."""

    def __init__(
        self,
        devices: int | str = 2,
        *,
        num_nodes: int = 1,
        accelerator: str = "cpu",
        engines: str = "local",
        partition: str | None = None,
        time: str | None = None,
        hosts: str | Sequence[str] | None = None,
        profile: str | None = None,
        controller_ip: str | None = None,
        detach: bool = False,
        idle_timeout: float | None = None,
        start_timeout: float = START_TIMEOUT,
    ):
        self.config, hosts = _check(devices, num_nodes, accelerator, engines, partition, time, hosts, detach, idle_timeout)
        self.kind, self.attached, self.broken = engines, False, ""
        self._record, self._watchdog, self._job_checked = "", None, 0.0
        self._processes: dict[int, Any] = {}  # pid -> the psutil process of each engine started here
        self.last_run_stopped = False  # the ranks' last run was stopped or failed (see engine_side.run)
        import ipyparallel as ipp

        options = {"profile": profile} if profile else {}
        if engines == "slurm":
            try:
                slurm_job.check_submittable(self.config, partition, time)
            except slurm_job.SlurmRefusal as refused:
                raise PoolError(str(refused)) from None
            options["config"] = slurm_job.batch_config(self.config, partition, time, _job_dir(profile))
        elif engines in ("mpi", "ssh"):
            options["config"] = _launcher_config(engines, hosts, self.config.num_processes)
        self.cluster = ipp.Cluster(
            n=self.config.world_size,
            engines=engines,
            controller_ip=controller_ip or ("127.0.0.1" if _on_this_machine(engines, hosts, self.config.num_nodes) else "*"),
            controller_args=HEARTBEAT,
            log_level=logging.ERROR,  # an engine stopped by a signal is no warning here
            shutdown_atexit=not detach,
            **options,
        )
        self.client = None
        try:
            # The watchdog comes first: a kernel killed while the controller and engines start leaves
            # them to it. ipyparallel starts them on a thread of its own, which an interrupt does not
            # stop: the interrupt waits until they are there.
            with interrupts_deferred():
                self._record, self._watchdog = watchdog.watch(
                    self.cluster,
                    engines=engines,
                    accelerator=self.config.accelerator,
                    detach=detach,
                    idle_timeout=watchdog.IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
                )
                self.cluster.start_cluster_sync()
                watchdog.started(self._record)
            self.client = self.cluster.connect_client_sync()
            if self.job:
                slurm_job.wait_for_engines(
                    self.job, lambda: len(self.client.ids), self.config.world_size,
                    nodes=self.config.num_nodes, partition=partition, timeout=start_timeout,
                )
            else:
                self.client.wait_for_engines(self.config.world_size, timeout=start_timeout, interactive=False)
            self.ranks = self._assign_ranks()
            # the processes of the engines started here, kept: ipyparallel forgets a launcher once its engine ended
            self._processes = {
                launcher.pid: launcher.process
                for engines in self.cluster.engines.values() for launcher in getattr(engines, "launchers", {}).values()
                if getattr(launcher, "process", None) is not None
            }
        except BaseException as error:
            self._end()
            if isinstance(error, slurm_job.SlurmRefusal):
                raise PoolError(f"{error}. The job was cancelled.") from None
            if isinstance(error, (KeyboardInterrupt, PoolError)):
                raise
            raise PoolError(f"the {engines} engines did not start: {type(error).__name__}: {error}") from None

    @classmethod
    def attach(
        cls, *, profile: str | None = None, cluster_id: str = "", accelerator: str | None = None, timeout: float = 30
    ) -> EngineCluster:
        """The engines of a detached pool (the one no kernel holds, when no `cluster_id` is given; held
        from now on by this kernel, whose stop ends it), or of a cluster started with ``ipcluster start``
        (its profile, or its cluster id; left running by stop)."""
        import ipyparallel as ipp

        pool = cls.__new__(cls)
        pool.kind, pool.attached, pool.broken = "attached", True, ""
        pool._record, pool._watchdog, pool._job_checked = "", None, 0.0
        pool.last_run_stopped = True  # unknown: what the ranks hold goes on from a fresh state
        found = _detached_pool(profile, cluster_id)
        if found is not None:
            pool._record, record = found
            pool.kind, pool.attached, cluster_id = record["engines"], False, record["cluster_id"]
            accelerator = accelerator or record["accelerator"]
        elif not profile and not cluster_id:
            raise PoolError(
                "there is no detached rank pool to attach to (%fabric start --detach makes one); for engines "
                "started with ipcluster, give --profile=NAME or --cluster-id=ID"
            )
        try:
            pool.cluster = ipp.Cluster.from_file(profile=profile, cluster_id=cluster_id)
            pool.client = pool.cluster.connect_client_sync()
            pool.client.wait_for_engines(1, timeout=timeout, interactive=False)
        except Exception as error:  # noqa: BLE001 - said in one sentence
            raise PoolError(
                f"no running cluster to attach to (profile={profile or 'default'!r}, cluster id={cluster_id!r}): {error}. "
                "Start one with `ipcluster start -n 2`, or use %fabric start."
            ) from None
        nodes = {_node(info) for info in pool.client[:].apply_sync(engine_side.describe)}
        per_node, extra = divmod(len(pool.client.ids), len(nodes))
        if extra:
            pool.client.close()
            raise PoolError(f"the cluster's {len(pool.client.ids)} engines are not spread evenly over its {len(nodes)} nodes")
        pool.config = RunConfig.resolve(accelerator=accelerator or "cpu", devices=per_node, num_nodes=len(nodes), strategy="ddp")
        pool.ranks = pool._assign_ranks()
        if pool._record:
            watchdog.adopt(pool._record)
        return pool

    # ----------------------------------------------------------------- what it is
    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def settings(self) -> dict[str, Any]:
        """The run settings its ranks fix: accelerator, devices per node, nodes."""
        settings = self.config.settings()
        return {name: settings[name] for name in ("accelerator", "devices", "num_nodes")}

    @property
    def up(self) -> bool:
        return self.client is not None and not self.broken

    @property
    def job(self) -> str:
        """The id of the Slurm job that holds the engines ('' for engines started otherwise)."""
        jobs = [getattr(engines, "job_id", "") for engines in self.cluster.engines.values()] if self.kind == "slurm" else []
        return next((job for job in jobs if job), "")

    def describe(self) -> str:
        """The ranks, their nodes, addresses and processes, as `%fabric pool` shows them (a pool that
        lost an engine or its controller is broken, and said so)."""
        self._notice_losses()
        if not self.up:
            return f"no rank pool: {self.broken}" if self.broken else "no rank pool"
        lines = [f"rank pool of {self.world_size} ranks ({self.kind} engines, {self.config.as_flags()}):"]
        if self.job:
            left = slurm_job.time_left(self.job)
            lines.append(f"  Slurm job {self.job}, time left: {left or 'unknown'}")
        for r in self.ranks:
            device = f"{self.config.accelerator}:{r.local_rank}" if self.config.accelerator == "cuda" else "cpu"
            lines.append(f"  rank {r.rank}: node {r.node} ({r.address}), local rank {r.local_rank}, {device}, engine {r.engine}, pid {r.pid}")
        return "\n".join(lines)

    def check_usable(self) -> None:
        """Raise PoolError unless every rank's engine, and the controller, are there to run."""
        self._notice_losses()
        if self.broken:
            raise PoolError(f"the rank pool is broken: {self.broken}. %fabric start makes a new one.")
        if self.client is None:
            raise PoolError("the rank pool was stopped; %fabric start makes a new one.")

    def check_fits(self, config: RunConfig) -> None:
        """PoolError unless a run of these settings runs on this pool's ranks (same accelerator and world)."""
        asked, has = (config.world_size, config.accelerator, config.num_nodes), (self.world_size, self.config.accelerator, self.config.num_nodes)
        if asked != has:
            raise PoolError(
                f"this run asks for {_ranks(*asked)}, but the rank pool has {_ranks(*has)}; drop those settings, or "
                "%fabric stop-pool first"
            )

    # ----------------------------------------------------------------- running
    def engine(self, rank: int) -> Any:
        return self.client[self.ranks[rank].engine]

    def signal(self, ranks: list[int] | tuple[int, ...], sig: int) -> None:
        """`sig` to these ranks' engines (directly where they run here, else through their launcher).
        An interrupt reaches what an engine here runs in its process group too (`!sleep 60`,
        `os.system`, `subprocess.run`, which wait with interrupts ignored), as a kernel's interrupt
        reaches its process group; the engine's nanny has a session of its own."""
        remote = False
        for rank in ranks:
            place = self.ranks[rank]
            if place.here:
                try:
                    if sig == signal.SIGINT and os.getpgid(place.pid) == place.pid:
                        os.killpg(place.pid, sig)
                    else:
                        os.kill(place.pid, sig)
                except ProcessLookupError:
                    pass
            else:
                remote = True
        if remote:
            self.cluster.signal_engines_sync(sig)

    def job_ended(self) -> str:
        """How the pool's Slurm job ended (e.g. 'Slurm job 7 was cancelled by scancel'), looked at
        most once a JOB_CHECK; '' while it runs, or for engines started otherwise."""
        if not self.job or time.monotonic() < self._job_checked + JOB_CHECK:
            return ""
        self._job_checked = time.monotonic()
        return slurm_job.ending(self.job, slurm_job.state(self.job))

    def _notice_losses(self) -> None:
        """A pool whose controller is gone, or an engine, is broken: the rest of it is ended."""
        if self.client is None or self.broken:
            return
        gone = self.controller_gone()
        dead = self.dead_ranks() if not gone else []
        if dead:  # and why, where Slurm knows: its job was cancelled, failed or reached its time limit
            ended = slurm_job.ending(self.job, slurm_job.state(self.job)) if self.job else ""
            lost = f"the engine of rank {dead[0]} is" if len(dead) == 1 else f"the engines of ranks {', '.join(map(str, dead))} are"
            gone = f"{ended}: {lost} gone" if ended else f"{lost} gone"
        if gone:
            self.mark_broken(gone)

    def controller_gone(self) -> str:
        """Why the pool's controller, which every request and result goes through, is gone ('' while
        its process runs; not known for engines started with ipcluster, whose controller may run
        elsewhere). nbfabric starts a pool's controller on this machine."""
        controller = self.cluster.controller if not self.attached else None
        pid = getattr(controller, "pid", -1) if controller is not None else -1
        return f"the pool's controller (pid {pid}) ended" if pid > 0 and not _alive(pid) else ""

    def exit_status(self, rank: int, wait: float = 1.0) -> int | None:
        """How the engine of `rank` ended, as the launcher that started it here saw it (its exit
        code, or minus the signal that killed it), waiting for that at most `wait` seconds; None
        where it is not known (engines elsewhere, or attached to)."""
        process = self._processes.get(self.ranks[rank].pid)
        deadline = time.monotonic() + wait
        while process is not None and time.monotonic() < deadline:
            code = getattr(process, "_exitcode", None)  # what the launcher's waiting thread got (psutil keeps it)
            if isinstance(code, int):
                return int(code)
            time.sleep(0.02)
        return None

    def dead_ranks(self) -> list[int]:
        """Ranks whose engine is gone: its process ended (engines here) or the controller dropped it."""
        registered = set(self.client.ids)
        return [r.rank for r in self.ranks if r.engine not in registered or (r.here and not _alive(r.pid))]

    def regroup(self) -> None:
        """After some ranks left the process group: every rank leaves it, and the next run's group
        meets on a fresh port."""
        everyone = self.client[[r.engine for r in self.ranks]]
        everyone.apply_sync(engine_side.leave_group)
        everyone.apply_sync(engine_side.set_main_port, self.engine(0).apply_sync(engine_side.free_port))

    def mark_broken(self, why: str) -> None:
        """A rank, or the controller, is lost: end the rest of the pool, whose process group cannot go
        on. Its engines here are killed first: what they hold is lost with the group, and an engine
        asked to stop would wait for a controller that may be gone (seconds each)."""
        self.broken = why
        if not self.attached:
            self.signal([r.rank for r in self.ranks if r.here], signal.SIGKILL)
        self._end()

    def stop(self) -> None:
        """End every engine (cancelling the Slurm job) and the watchdog, or detach from engines
        started with ipcluster."""
        self._end()

    def _end(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
        if not self.attached:
            job = self.job
            now = slurm_job.state(job) if job else None
            self.cluster.stop_cluster_sync()
            # a job Slurm ends already is left to end (its KillWait can be 30 s); a requeued one is cancelled
            if job and (not slurm_job.ending(job, now) or slurm_job.requeued(now)):
                slurm_job.wait_until_gone([job])
        if self._record:
            watchdog.forget(self._record, self._watchdog)
            self._record, self._watchdog = "", None

    # ----------------------------------------------------------------- starting
    def _assign_ranks(self) -> list[PoolRank]:
        """Number the engines node by node, give each torchrun's variables, and check the nodes."""
        ids = sorted(self.client.ids)
        infos = dict(zip(ids, self.client[ids].apply_sync(engine_side.describe)))
        engines = sorted(ids, key=lambda e: (infos[e]["task"] is None, infos[e]["task"] or 0, e))
        nodes = list(dict.fromkeys(_node(infos[e]) for e in engines))
        per_node = self.config.num_processes
        counts = {node: sum(_node(info) == node for info in infos.values()) for node in nodes}
        if len(nodes) != self.config.num_nodes or any(count != per_node for count in counts.values()):
            found = ", ".join(f"{name} ({address}): {count}" for (name, address), count in counts.items())
            raise PoolError(f"expected {per_node} engines on each of {self.config.num_nodes} nodes, found {found}")
        ranks = []
        for node_rank, node in enumerate(nodes):
            mine = [e for e in engines if _node(infos[e]) == node]
            for local_rank, engine in enumerate(mine):
                info = infos[engine]
                ranks.append(PoolRank(len(ranks), local_rank, node_rank, node[0], info["address"], info["pid"], engine))
        one_host = len({infos[r.engine]["host"] for r in ranks}) == 1
        main_address = "127.0.0.1" if one_host else ranks[0].address
        port = self.client[ranks[0].engine].apply_sync(engine_side.free_port)
        key = new_run_key()  # the ranks' store admits only them
        for r in ranks:
            env = rank_environment(
                local_rank=r.local_rank,
                local_world_size=per_node,
                node_rank=r.node_rank,
                num_nodes=self.config.num_nodes,
                main_address=main_address,
                main_port=port,
                threads=None,
                run_key=key,
            )
            self.client[r.engine].apply_sync(engine_side.join, env, per_node)
        return ranks


def _check(
    devices: Any, num_nodes: int, accelerator: str, engines: str, partition: str | None, time: str | None,
    hosts: str | Sequence[str] | None, detach: bool, idle_timeout: float | None,
) -> tuple[RunConfig, tuple[str, ...]]:
    """The pool's settings and its hosts, checked before anything starts."""
    if engines not in ENGINE_KINDS:
        raise ValueError(f"engines={engines!r} is not valid; choose one of {', '.join(ENGINE_KINDS)}")
    if (partition or time) and engines != "slurm":
        raise ValueError("--partition and --time are Slurm's; use them with --engines=slurm")
    hosts = tuple(host.strip() for host in (hosts.split(",") if isinstance(hosts, str) else hosts or ()))
    if hosts and engines not in ("mpi", "ssh"):
        raise ValueError("--hosts names the machines of MPI or SSH engines; use it with --engines=mpi or --engines=ssh")
    if engines == "ssh" and not hosts:
        raise ValueError("--engines=ssh needs --hosts=HOST[,HOST...]: the machines to start engines on over SSH")
    if "" in hosts or len(set(hosts)) != len(hosts):
        raise ValueError(f"--hosts={','.join(hosts)} is not valid; name each host once, separated by commas")
    if hosts and len(hosts) != num_nodes:
        raise ValueError(f"--hosts names {len(hosts)} host(s) but --num-nodes={num_nodes}; give one host per node")
    if idle_timeout is not None and not detach:
        raise ValueError("--idle-timeout is how long a detached pool waits for a kernel; use it with --detach")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ValueError(f"--idle-timeout={idle_timeout} is not valid; give a number of seconds above 0")
    config = RunConfig.resolve(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    if engines == "local" and config.num_nodes > 1:
        raise ValueError(f"--num-nodes={config.num_nodes} needs engines on several machines: --engines=slurm, mpi or ssh")
    needed = {"slurm": "sbatch", "mpi": "mpiexec", "ssh": "ssh"}.get(engines)
    if needed and _missing(needed):
        raise ValueError(f"--engines={engines} needs {needed}, which is not on PATH here")
    return config, hosts


def _launcher_config(engines: str, hosts: tuple[str, ...], per_host: int) -> Any:
    """ipyparallel's settings for MPI or SSH engines: `per_host` engines on each host, added to what
    the profile sets (its ssh and scp options, remote python, mpiexec options)."""
    from traitlets.config import Config

    settings = Config()
    if engines == "ssh":
        settings.SSHEngineSetLauncher.engines = {host: per_host for host in hosts}
    elif _open_mpi():  # spread over the hosts, not bound to one core (a rank shares out its threads), as root where we are root
        host_list = ["--host", ",".join(f"{host}:{per_host}" for host in hosts)] if hosts else []
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        settings.MPIEngineSetLauncher.mpi_args.extend([*host_list, "--bind-to", "none", *root])
    elif hosts:
        raise ValueError(
            "--hosts speaks Open MPI's mpiexec; for another MPI, set its host options in the profile "
            "(c.MPILauncher.mpi_args in ipcluster_config.py) and leave out --hosts"
        )
    return settings


def _open_mpi() -> bool:
    """Whether the mpiexec on PATH is Open MPI's."""
    try:
        version = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in version or "OpenRTE" in version


def _on_this_machine(engines: str, hosts: tuple[str, ...], num_nodes: int) -> bool:
    """Whether every engine runs on this machine (the controller then listens on loopback only)."""
    if hosts:
        return all(is_loopback(host.rpartition("@")[2].partition(":")[0]) for host in hosts)
    return engines == "local" or (engines == "mpi" and num_nodes == 1)


def _node(info: dict[str, Any]) -> tuple[str, str]:
    """An engine's node: its name and the address it was reached at (which tells apart the hosts of
    an SSH pool that share a name)."""
    return info["node"], info["address"]


def _detached_pool(profile: str | None, cluster_id: str) -> tuple[str, dict] | None:
    """The detached pool to attach to: the one of this cluster id, or the only one no kernel holds
    (None: none is recorded; PoolError: it is held, or several are free)."""
    import ipyparallel as ipp

    pools = watchdog.detached_pools(ipp.Cluster(**({"profile": profile} if profile else {})).profile_dir)
    if cluster_id:
        pools = [(path, record) for path, record in pools if record["cluster_id"] == cluster_id]
    free = [(path, record) for path, record in pools if not record["held"]]
    if pools and not free:
        held = pools[0][1]
        raise PoolError(
            f"the detached rank pool {held['cluster_id']} is held by a running kernel (pid {held['owner'][0]}); "
            "%fabric stop-pool there, or end that kernel first"
        )
    if len(free) > 1:
        ids = ", ".join(record["cluster_id"] for _, record in free)
        raise PoolError(f"there are {len(free)} detached rank pools ({ids}); choose one with --cluster-id=ID")
    return free[0] if free else None


def _job_dir(profile: str | None) -> str:
    """Where the Slurm job's batch file and output go: the ipyparallel profile's log folder (not
    the notebook's folder, and shared with the nodes where home is)."""
    from IPython.paths import get_ipython_dir

    folder = os.path.join(get_ipython_dir(), f"profile_{profile or 'default'}", "log")
    os.makedirs(folder, exist_ok=True)
    return folder


def _missing(program: str) -> bool:
    import shutil

    return shutil.which(program) is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _ranks(count: int, accelerator: str, nodes: int) -> str:
    return f"{count} rank(s) on {accelerator}" + (f" on {nodes} nodes" if nodes > 1 else "")
