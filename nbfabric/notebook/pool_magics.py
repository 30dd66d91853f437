"""`%fabric start | attach | pool | stop-pool | pull`: the rank pool that later `%%fabric` cells run on."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from IPython.core.error import UsageError

from nbfabric.launcher import interrupts_deferred
from nbfabric.notebook.cell import pack_rank_name, rank_holds
from nbfabric.notebook.changes import changed_in_place, fingerprint
from nbfabric.pool import ENGINE_KINDS, PoolError, RankPool, watchdog
from nbfabric.tracebacks import shown_briefly

POOL_COMMANDS = ("start", "attach", "pool", "stop-pool", "pull", "push")
POOL_HELP = """\
rank pool (ranks that outlive a cell; while one is up, %%fabric cells run on it):
  %fabric start --devices=N [--num-nodes=M] [--accelerator=cpu|cuda] [--engines=local|slurm|mpi|ssh]
                [--partition=P] [--time=T] [--hosts=HOST,...] [--profile=NAME] [--controller-ip=ADDRESS]
                [--detach [--idle-timeout=SECONDS]]
                (mpi and ssh engines: N on each of --hosts, one host per node; ssh and mpiexec
                options in the profile's ipcluster_config.py; the pool ends when the kernel
                dies, unless --detach keeps it for %fabric attach, 3600 s by default)
  %fabric attach [--profile=NAME] [--cluster-id=ID]  hold the detached pool no kernel holds, or use
                                                     engines started with ipcluster
  %fabric pool                                       show the ranks, their nodes and devices
  %fabric pull NAME [--rank=N]                       bring one name back from a rank (a model set up
                                                     on the pool comes whole, gathered from every rank)
  %fabric push NAME                                  send the notebook's NAME to the ranks with the next
                                                     cell that reads it, in place of theirs
  %fabric stop-pool                                  end every engine (and the Slurm job)"""


@dataclass
class PoolInUse:
    """The notebook's rank pool (None: cells start their own ranks) and the names its ranks hold:
    name a cell bound -> the notebook's object for it then (the ranks' copy is current while the
    notebook still has that object); for a name whose value came back, that object's fingerprint
    then, to tell when the notebook changes it in place."""

    pool: RankPool | None = None
    names_on_ranks: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, bytes] = field(default_factory=dict)
    pulling: str = ""  # the name `%fabric pull` brings from rank 0 now, as a cell's last value
    refused: str = ""  # why that value did not come back ('' when it did)

    def use(self, pool: RankPool | None) -> None:
        self.pool = pool
        self.names_on_ranks = {}
        self.fingerprints = {}

    def hold(self, name: str, value: Any, *, came_back: bool) -> None:
        """The ranks hold `name`; the notebook's object for it is `value`, equal to theirs if it came back."""
        self.names_on_ranks[name] = value
        digest = fingerprint(value) if came_back else None
        if digest is None:
            self.fingerprints.pop(name, None)
        else:
            self.fingerprints[name] = digest

    def release(self, name: str) -> None:
        """The ranks hold `name` no more: a cell that reads it gets the notebook's."""
        self.names_on_ranks.pop(name, None)
        self.fingerprints.pop(name, None)

    def changed_here(self, names: Iterable[str], namespace: dict[str, Any]) -> list[str]:
        """Those of `names` that the ranks hold and the notebook has changed in place since their
        value came back (each is found once)."""
        before = {name: self.fingerprints[name] for name in sorted(set(names) & self.fingerprints.keys())}
        changed = changed_in_place(namespace, self.names_on_ranks, before)
        for name in changed:
            del self.fingerprints[name]
        return changed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")


def _parser(command: str) -> _Parser:
    parser = _Parser(prog=f"%fabric {command}", add_help=False)
    if command == "start":
        parser.add_argument("--devices", default="2")
        parser.add_argument("--num-nodes", dest="num_nodes", type=int, default=1)
        parser.add_argument("--accelerator", default="cpu")
        parser.add_argument("--engines", default="local", choices=ENGINE_KINDS)
        parser.add_argument("--partition")
        parser.add_argument("--time")
        parser.add_argument("--hosts")
        parser.add_argument("--profile")
        parser.add_argument("--controller-ip", dest="controller_ip")
        parser.add_argument("--detach", action="store_true")
        parser.add_argument("--idle-timeout", dest="idle_timeout", type=float)
    elif command == "attach":
        parser.add_argument("--profile")
        parser.add_argument("--cluster-id", dest="cluster_id", default="")
        parser.add_argument("--accelerator")
    elif command == "pull":
        parser.add_argument("name")
        parser.add_argument("--rank", type=int, default=0)
    elif command == "push":
        parser.add_argument("name")
    return parser


def pool_command(shell: Any, line: str, in_use: PoolInUse) -> Any:
    """Run one pool command line (its first word is in POOL_COMMANDS)."""
    command, *rest = shlex.split(line)
    args = _parser(command).parse_args(rest)
    try:
        if command == "start":
            return _start(args, in_use)
        if command == "attach":
            return _attach(args, in_use)
        if command == "pull":
            return _pull(shell, args, in_use)
        if command == "push":
            return _push(shell, args, in_use)
        pool = in_use.pool
        if command == "stop-pool":
            if pool is None:
                raise UsageError("there is no rank pool to stop")
            try:
                with interrupts_deferred():  # a stop cut short would leave engines running that nobody knows of
                    pool.stop()
            except KeyboardInterrupt:
                raise shown_briefly(KeyboardInterrupt(f"the stop went on to its end: the rank pool was {_stopped(pool)}")) from None
            finally:
                in_use.use(None)
            print(f"the rank pool was {_stopped(pool)}")
            return None
        print(pool.describe() if pool is not None else "no rank pool; %fabric start makes one")
    except (ValueError, PoolError) as error:
        raise UsageError(str(error)) from None
    return None


def _stopped(pool: RankPool) -> str:
    return "detached; its engines keep running" if pool.attached else "stopped: no engine is left"


def _start(args: argparse.Namespace, in_use: PoolInUse) -> None:
    pool = in_use.pool
    if pool is not None and pool.up:
        raise UsageError("a rank pool is already up (%fabric pool shows it); %fabric stop-pool ends it")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    options = {name: value for name, value in vars(args).items() if value is not None}
    options["devices"] = devices
    try:
        in_use.use(RankPool(**options))
    except KeyboardInterrupt:
        raise shown_briefly(KeyboardInterrupt("the rank pool's start was stopped; nothing of it is left running")) from None
    print(in_use.pool.describe())
    if args.detach:
        print("detached: it outlives this kernel, for %fabric attach in another, and ends itself once no kernel "
              f"has held it for {args.idle_timeout or watchdog.IDLE_TIMEOUT:g} s; %fabric stop-pool ends it now")


def _attach(args: argparse.Namespace, in_use: PoolInUse) -> None:
    pool = in_use.pool
    if pool is not None and pool.up:
        raise UsageError("a rank pool is already up; %fabric stop-pool ends it first")
    in_use.use(RankPool.attach(profile=args.profile, cluster_id=args.cluster_id, accelerator=args.accelerator))
    print(in_use.pool.describe())


def _pull(shell: Any, args: argparse.Namespace, in_use: PoolInUse) -> Any:
    """Bind NAME in the notebook to its value on a rank. From rank 0 this runs on every rank: a
    model set up on the pool comes whole (gathered where it is sharded), a plain copy on the CPU,
    while the ranks keep theirs."""
    pool = in_use.pool
    if pool is None:
        raise UsageError("there is no rank pool; %fabric start makes one")
    pool.check_usable()
    if not args.name.isidentifier():
        raise UsageError(f"{args.name!r} is not a name; give one name the ranks hold, e.g. %fabric pull model")
    if not 0 <= args.rank < pool.world_size:
        raise UsageError(f"--rank={args.rank} is not valid; choose 0 to {pool.world_size - 1}")
    try:
        return _pull_from(shell, args, in_use, pool)
    except KeyboardInterrupt:
        raise shown_briefly(KeyboardInterrupt(f"the pull of {args.name} was stopped; the notebook's {args.name} is as it was")) from None


def _pull_from(shell: Any, args: argparse.Namespace, in_use: PoolInUse, pool: RankPool) -> Any:
    # apply_async().get(), not apply_sync, which answers an interrupt with its unfinished request
    if not pool.engine(args.rank).apply_async(rank_holds, args.name).get():
        print(f"{args.name} was not brought back from rank {args.rank}: not defined there", file=sys.stderr)
        return None
    if args.rank == 0:
        if args.name in in_use.names_on_ranks:  # the ranks' own value, not the notebook's, is wanted
            in_use.hold(args.name, shell.user_ns.get(args.name, in_use.names_on_ranks[args.name]), came_back=False)
        in_use.pulling, in_use.refused = args.name, ""
        try:
            value = shell.run_cell_magic("fabric", "--no-return --no-widgets", f"fabric._whole({args.name})")
        finally:
            in_use.pulling = ""
        if in_use.refused:
            print(f"{args.name} was not brought back from rank 0: {in_use.refused}", file=sys.stderr)
            return None
    else:
        returned = pool.engine(args.rank).apply_async(pack_rank_name, args.name).get()
        values = returned.load()
        if args.name not in values:
            why = returned.skipped.get(args.name, "not defined")
            print(f"{args.name} was not brought back from rank {args.rank}: {why}", file=sys.stderr)
            return None
        value = values[args.name]
    shell.user_ns[args.name] = value
    in_use.hold(args.name, value, came_back=args.rank == 0)  # the ranks keep their own in later cells
    return None


def _push(shell: Any, args: argparse.Namespace, in_use: PoolInUse) -> None:
    """The notebook's value of NAME goes to the ranks with the next cell that reads it."""
    if in_use.pool is None:
        raise UsageError("there is no rank pool; %fabric start makes one")
    if args.name not in shell.user_ns:
        raise UsageError(f"the notebook has no {args.name} to send; give a name it holds, e.g. %fabric push config")
    in_use.release(args.name)
    print(f"{args.name}: the notebook's goes to the pool's ranks with the next cell that reads it")