"""`%%fabric` runs a cell on N ranks; `%fabric` shows or sets the defaults for later cells,
shows the hardware picker, and stops or waits for a background run."""

from __future__ import annotations

import keyword
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from nbfabric.devices import describe_hardware
from nbfabric.fabric import Fabric
from nbfabric.launcher.output import TextSink
from nbfabric.launcher.rank_links import rank_links
from nbfabric.launcher.processes import reaping_deferred
from nbfabric.launcher.shipping import Shipment
from nbfabric.notebook.background import BackgroundRun, StoppableTextSink
from nbfabric.notebook.where import places_text
from nbfabric.notebook.cell import Cell, cell_number, compile_cell, notebook_names, pack_for_notebook, run_in_rank, uses_ipython, values_for_ranks
from nbfabric.notebook.changes import reached_names
from nbfabric.notebook.pool_magics import POOL_COMMANDS, POOL_HELP, PoolInUse, pool_command
from nbfabric.pool import PoolError, PoolLauncher, RankPool
from nbfabric.notebook.picker import picker
from nbfabric.notebook.returns import LAST_VALUE
from nbfabric.notebook.run_view import RunView
from nbfabric.record import RecordingSink, RunRecord
from nbfabric.run_flags import RunPlan, add_run_flags, plan_run
from nbfabric.tracebacks import shown_briefly
from nbfabric.user_config import load_defaults

PER_CELL = ("return_names", "no_return", "out", "background")
NOT_ON_A_POOL = ("start_method", "main_address", "main_port", "node_rank", "run_key")  # a pool's ranks have met already
LINE_ONLY = ("picker", "config", "action")
_ABSENT = object()  # a name the notebook does not have
WHERE_WAIT = 5.0  # seconds %fabric where waits for the run's answer


@dataclass(frozen=True)
class CellRequest:
    """A `%%fabric` cell's checked flags: the run's plan and what happens around it."""

    plan: RunPlan
    names: list[str] | None  # what to bring back; None: every name the cell binds
    out: str | None
    background: bool
    widgets: bool
    pool: RankPool | None  # the rank pool it runs on, if one is up


def _run_flag_arguments(function: Any) -> Any:
    """The run flags (`run_flags.RUN_FLAGS`) as magic_arguments declarations."""
    declared: list[Any] = []
    add_run_flags(lambda *names, **options: declared.append(magic_arguments.argument(*names, **options)))
    for declare in reversed(declared):
        function = declare(function)
    return function


@magics_class
class FabricMagics(Magics):
    """Holds the defaults that `%fabric --flag=value` sets for later `%%fabric` cells."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.defaults: dict[str, Any] = {}
        self.background: BackgroundRun | None = None
        self.pool = PoolInUse()  # the rank pool cells run on, and the names its ranks hold
        self._background_pool_cell: Cell | None = None  # a background run on the pool

    @magic_arguments.magic_arguments()
    @_run_flag_arguments
    @magic_arguments.argument("--return", dest="return_names", help="bring back only these names, e.g. model,losses")
    @magic_arguments.argument("--no-return", dest="no_return", action="store_true", help="bring back no names")
    @magic_arguments.argument("--out", help="store the run record (output, metrics, exit codes) under this name")
    @magic_arguments.argument("--no-widgets", dest="widgets", action="store_const", const="off", help="show the run as text lines, not as a dashboard")
    @magic_arguments.argument("--widgets", dest="widgets", action="store_const", const="on", help="show a live dashboard where widgets can render, once the run lasts 0.5 s (the default)")
    @magic_arguments.argument("--background", action="store_true", help="return at once while the run goes on; see %%fabric wait and %%fabric stop")
    @magic_arguments.argument("-h", "--help", action="store_true", help="show this help")
    @magic_arguments.argument("--picker", action="store_true", help="(%%fabric only) show the hardware picker, whose choices become the defaults")
    @magic_arguments.argument("--config", help="(with --picker) the settings file its Save button writes")
    @magic_arguments.argument(
        "action",
        nargs="?",
        choices=("stop", "wait", "where"),
        help="(%%fabric only) stop the background run, wait for it and bring back its names, or show where each of its ranks is now",
    )
    @line_cell_magic
    def fabric(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on every rank, with `fabric` (a launched Fabric) and the notebook's variables.

        A live dashboard shows the ranks, their output and the logged metrics once the run has
        lasted half a second (text lines where widgets cannot render, and for a shorter run);
        the names the cell binds on rank 0 and its last expression come
        back into the notebook. Settings come from the cell's flags, then the `%fabric` defaults,
        then the saved defaults (the picker's Save button). As a line magic: with flags, set the
        defaults for later cells; without, show the defaults and the hardware found; `%fabric start`
        and its companions (below) manage a rank pool.
        """
        if cell is None and line.split(None, 1)[:1] and line.split()[0] in POOL_COMMANDS:
            if line.split()[0] in ("stop-pool", "pull"):
                self._refuse_while_running()  # a background run may be on the pool's ranks
            return pool_command(self.shell, line, self.pool)
        args = _parse(self.fabric, line, cell is None)
        given = {name: value for name, value in vars(args).items() if value is not None and value is not False}
        if args.help:
            print(self.fabric.parser.format_help())
            print(POOL_HELP)
            return None
        if cell is None:
            return self._line(args, given)
        if rank_links() is not None:
            raise UsageError("a %%fabric cell cannot run inside the ranks of another; its code is on every rank already: run it as it is")
        request = self._check_cell(args, given)  # 1. check: nothing changes if this raises
        try:
            compiled = compile_cell(self.shell, cell, line)
        except SyntaxError as error:  # without the frames of nbfabric's parsing under the cell's line
            raise error.with_traceback(None) from None
        values = self._values_for_ranks(request, compiled)
        self._drop_finished_background()
        record = RunRecord(request.plan.config)  # 2. the view
        view, dashboard = self._make_view(request)
        if request.out:
            self.shell.user_ns[request.out] = record
        launch = self._launcher_call(request, compiled, values, RecordingSink(record, view))  # 3. the run
        if request.background:
            if dashboard is not None:
                dashboard.show()
            self._background_pool_cell = None
            if request.pool is not None:
                self._remember_rank_names(compiled)  # the ranks' copies stay theirs
                self._background_pool_cell = compiled
            return self._start_background(launch, record, view, dashboard)
        with reaping_deferred():  # the ranks end once the cell has its results
            try:
                returned = launch()
            except BaseException as error:
                record.error = shown_briefly(error)
                if request.pool is not None:
                    self._after_failed_pool_cell(compiled)
                raise
            finally:
                record.duration = time.time() - record.started
                if isinstance(view, RunView):
                    view.end(record.error)
            try:
                return self._bring_back(returned)
            finally:
                if request.pool is not None:
                    self._remember_rank_names(compiled, returned)

    def _check_cell(self, args: Any, given: dict[str, Any]) -> CellRequest:
        """Every flag of a cell checked, with the defaults under them; raises UsageError, changes nothing."""
        line_only = [_flag(name) for name in LINE_ONLY if name in given]
        if line_only:
            raise UsageError(f"{', '.join(line_only)} belongs on a %fabric line, not on a %%fabric cell")
        self._refuse_while_running()
        pool = self.pool.pool
        cell_flags = {k: v for k, v in given.items() if k not in PER_CELL}
        if pool is not None:
            try:
                pool.check_usable()
            except PoolError as error:
                raise UsageError(str(error)) from None
            unused = [_flag(name) for name in NOT_ON_A_POOL if name in cell_flags]
            if unused:
                raise UsageError(
                    f"{', '.join(unused)} cannot apply to a cell on the rank pool, whose ranks are started and have met "
                    "already; drop it, or %fabric stop-pool first"
                )
            settings = {**self._saved_defaults(), **self.defaults, **pool.settings, **cell_flags}
            settings.pop("start_method", None)
        else:
            settings = {**self._saved_defaults(), **self.defaults, **cell_flags}
        widgets = settings.pop("widgets", None) != "off"
        plan = _plan(settings, ranks_exist=pool is not None)
        if pool is not None:
            try:
                pool.check_fits(plan.config)
            except PoolError as error:
                raise UsageError(str(error)) from None
            if plan.debug:
                raise UsageError(
                    "--debug cannot check a rank pool's collectives: torch.distributed checks them only in a process "
                    "group made with its checks on, and the pool's outlives the cell; run the cell on ranks of its "
                    "own (%fabric stop-pool first)"
                )
        if args.out is not None:
            _check_name("--out", args.out, "a Python name, such as run")
        return CellRequest(plan, _wanted_names(args), args.out, bool(args.background), widgets, pool)

    def _values_for_ranks(self, request: CellRequest, cell: Cell) -> dict[str, Any] | Shipment:
        """The notebook's names as the ranks get them; a name that cannot be sent is a UsageError."""
        forked = request.pool is None and request.plan.config.start_method == "fork"
        held = self.pool.names_on_ranks if request.pool is not None else None
        if held:
            changed = self.pool.changed_here(reached_names(cell.read_names, self.shell.user_ns), self.shell.user_ns)
            if changed:
                print(
                    f"{', '.join(changed)}: changed in the notebook since it came back from the pool's ranks, which go on "
                    f"with their own; %fabric push {changed[0]} sends the notebook's to them",
                    file=sys.stderr,
                )
        if not forked and request.pool is None and uses_ipython(cell, self.shell.user_ns):
            raise UsageError(
                "this cell uses IPython (a %magic, a !command or get_ipython()), which spawned ranks, plain Python "
                "processes, do not have; run it with --start-method=fork or on a rank pool, or run commands with subprocess"
            )
        values = values_for_ranks(cell, self.shell.user_ns, forked=forked, held=held)
        if isinstance(values, Shipment) and values.left:
            raise UsageError(values.refusal("the rank pool" if request.pool is not None else "the spawned ranks"))
        return values

    def _remember_rank_names(self, cell: Cell, returned: Any = None) -> None:
        """The names the cell bound, and those whose values came back, live on the ranks; the
        notebook's object for each, now, marks the ranks' copy as current until the notebook binds
        the name anew (or changes a value that came back: said at the next cell that reads it).
        Names rank 0 deleted live there no more."""
        deleted = set(returned.deleted) if returned is not None else set()
        came_back = set(returned.names) - set(returned.skipped) if returned is not None else set()
        for name in dict.fromkeys([*cell.bound_names, *sorted(came_back)]):
            if name not in deleted:
                self.pool.hold(name, self.shell.user_ns.get(name, _ABSENT), came_back=name in came_back)
        for name in deleted:
            self.pool.release(name)

    def _after_failed_pool_cell(self, cell: Cell) -> None:
        """What the cell bound on the ranks before it stopped stays theirs, which is said; a name it
        may have deleted there is the notebook's again, sent with the next cell that reads it."""
        self._remember_rank_names(cell)
        for name in cell.deleted_names:
            self.pool.release(name)
        bound = notebook_names([name for name in cell.bound_names if name not in cell.imported_names])
        if bound and self.pool.pool is not None and self.pool.pool.up:
            print(
                f"what this cell bound on the pool's ranks before it stopped stays there for the next cells: {', '.join(bound)}; "
                "the notebook keeps its own values (%fabric pull NAME brings rank 0's here)",
                file=sys.stderr,
            )

    def _make_view(self, request: CellRequest) -> tuple[Any, Any]:
        """The cell's view of the run (a Sink), and the dashboard when it shows one from the start."""
        config, ranks = request.plan.config, request.plan.shown_ranks
        text = (StoppableTextSink if request.background else TextSink)(ranks=ranks, in_place_progress=True)
        if not (request.widgets and widgets_can_render(self.shell)):
            return text, None
        if request.background:  # the cell returns at once: show the dashboard now
            dashboard = _dashboard(config, ranks)
            return dashboard, dashboard
        return RunView(config, partial(_dashboard, config, ranks), text), None

    def _launcher_call(self, request: CellRequest, cell: Cell, values: Any, sink: Any) -> Callable[[], Any]:
        """The run, ready to start: the cell on every rank, on the pool or through the launcher for its settings."""
        plan = request.plan
        fabric = Fabric.from_config(plan.config, timeout=plan.timeout, debug=plan.debug)
        launcher = PoolLauncher(request.pool, timeout=plan.timeout, sink=sink) if request.pool is not None else None
        finish = partial(pack_for_notebook, cell, request.names)
        return partial(fabric._launch, run_in_rank, (cell, values), launcher=launcher, sink=sink, place=plan.place, new_processes=True, finish=finish)

    def _bring_back(self, returned: Any) -> Any:
        """Put the names rank 0 sent into the notebook; return the cell's last value."""
        if returned is None:  # the run succeeded, but rank 0 sent nothing: its code left by sys.exit
            print("nothing was brought back: rank 0 left the run (sys.exit) before the cell's names were sent", file=sys.stderr)
        values = returned.load() if returned is not None else {}
        last_value = values.pop(LAST_VALUE, None)
        self.shell.user_ns.update(values)
        for name in returned.deleted if returned is not None else ():
            self.shell.user_ns.pop(name, None)
        skipped = dict(returned.skipped) if returned is not None else {}
        if self.pool.pulling and LAST_VALUE in skipped:  # %fabric pull says it, naming the name
            self.pool.refused = skipped.pop(LAST_VALUE)
        if skipped:
            listed = ", ".join(f"{name} ({why})" for name, why in skipped.items())
            kept = "; they stay on the pool's ranks for the next cell (%fabric pull NAME brings a model here whole)" if self.pool.pool is not None and self.pool.pool.up else ""
            print(f"not brought back from rank 0: {listed}{kept}", file=sys.stderr)
        return last_value

    def _line(self, args: Any, given: dict[str, Any]) -> Any:
        per_cell = [_flag(name) for name in PER_CELL if name in given]
        if per_cell:
            raise UsageError(f"{', '.join(per_cell)} belongs on a %%fabric cell, not in the defaults")
        if args.action and len(given) > 1:
            raise UsageError(f"%fabric {args.action} takes no flags")
        if args.action == "stop":
            return self._stop_background()
        if args.action == "wait":
            return self._wait_background()
        if args.action == "where":
            return self._where_background()
        if args.config and not args.picker:
            raise UsageError("--config names the file the picker saves to; use it with --picker")
        if args.picker:
            if len(given) > 1 + ("config" in given):
                raise UsageError("%fabric --picker takes no other flag than --config")
            display(picker(args.config))
            return None
        return self._set_or_show_defaults(given)

    def _set_or_show_defaults(self, given: dict[str, Any]) -> None:
        saved = self._saved_defaults()
        settings = {**self.defaults, **given}
        widgets = {**saved, **settings}.get("widgets") != "off"
        plan = _plan({name: value for name, value in {**saved, **settings}.items() if name != "widgets"})
        self.defaults = settings  # only once they passed the check
        extra = " ".join(flag for flag in (plan.extra_flags, "" if widgets else "--no-widgets") if flag)
        print(f"%%fabric defaults: {plan.config.as_flags()}" + (f" {extra}" if extra else ""))
        print(f"hardware: {describe_hardware()}")
        pool = self.pool.pool
        if pool is not None:
            print(f"cells run on the rank pool of {pool.world_size} ranks (%fabric pool shows it)" if pool.up else f"the rank pool is broken: {pool.broken}")

    def _saved_defaults(self) -> dict[str, Any]:
        """The user's saved settings (the lowest layer, under the `%fabric` defaults and the cell's flags)."""
        try:
            return load_defaults()
        except ValueError as error:
            raise UsageError(str(error)) from None

    # ----------------------------------------------------------------- background runs
    def _refuse_while_running(self) -> None:
        run = self.background
        if run is not None and run.running:
            raise UsageError(
                f"the background run {run.label} is still running; "
                "%fabric wait waits for it, %fabric stop ends it"
            )

    def _drop_finished_background(self) -> None:
        run = self.background
        if run is not None:
            what = f"error ({_first_line(run.record.error)})" if run.record.error is not None else "result"
            print(f"dropping the unwaited {what} of the background run {run.label}", file=sys.stderr)
            self.background = None

    def _start_background(self, launch: Any, record: RunRecord, view: Any, dashboard: Any) -> None:
        label = f"of cell [{cell_number(self.shell)}] ({record.config.as_flags()})"
        finish = dashboard.finish if dashboard is not None else partial(_say_if_failed, label)
        self.background = BackgroundRun(label, launch, record, view, finish)
        if dashboard is None:
            print("running in the background: %fabric wait brings back its names, %fabric where shows where its ranks are, %fabric stop ends it", file=sys.stderr)

    def _background_run(self) -> BackgroundRun:
        if self.background is None:
            raise UsageError("there is no background run; start one with %%fabric --background")
        return self.background

    def _stop_background(self) -> None:
        run = self._background_run()
        run.stop()
        self.background = None
        print(f"stopped the background run {run.label}")

    def _where_background(self) -> None:
        run = self._background_run()
        if not run.running:
            print(f"the background run {run.label} has ended; %fabric wait brings back its result")
            return
        run.view.where.ask()
        print(places_text(run.view.where.wait(WHERE_WAIT), run.label))

    def _wait_background(self) -> Any:
        run = self._background_run()
        try:
            returned = run.wait()
        except BaseException as error:
            raise shown_briefly(error)
        finally:
            if not run.running:
                self.background = None
                run.view.settle()
        try:
            return self._bring_back(returned)
        finally:
            if self._background_pool_cell is not None:
                self._remember_rank_names(self._background_pool_cell, returned)
                self._background_pool_cell = None


def widgets_can_render(shell: Any) -> bool:
    """In a Jupyter kernel (not a terminal IPython) with ipywidgets installed."""
    if getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _dashboard(config: Any, ranks: set[int] | None, started: float | None = None) -> Any:
    from nbfabric.notebook.dashboard import Dashboard

    return Dashboard(config, ranks, started)


def _parse(magic: Any, line: str, line_magic: bool) -> Any:
    """The flags of `line`; a word that is neither a flag nor an action is named with what is allowed."""
    try:
        return magic_arguments.parse_argstring(magic, line)
    except UsageError as error:
        stray = re.search(r"argument action: invalid choice: (.+?) \(choose from", str(error))
        if stray is None:
            raise
        allowed = ", ".join(("stop", "wait", "where", *POOL_COMMANDS) if line_magic else ("stop", "wait", "where"))
        raise UsageError(
            f"{stray.group(1)} is not a flag, nor one of {allowed}; several names go as one flag, such as --return=model,losses"
        ) from None


def _flag(name: str) -> str:
    return "stop or wait" if name == "action" else f"--{name.replace('_names', '').replace('_', '-')}"


def _plan(settings: dict[str, Any], *, ranks_exist: bool = False) -> RunPlan:
    """The run's checked settings; a bad value is a UsageError that lists the valid choices.
    `ranks_exist`: a pool's ranks run it (their store has its own key)."""
    try:
        return plan_run(settings, ranks_exist=ranks_exist)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _wanted_names(args: Any) -> list[str] | None:
    if args.no_return and args.return_names:
        raise UsageError("--return and --no-return exclude each other")
    if args.no_return:
        return []
    if args.return_names is not None:
        names = [name.strip() for name in args.return_names.split(",") if name.strip()]
        if not names:
            raise UsageError("--return needs the names to bring back, such as --return=model or --return=model,losses (--no-return brings none)")
        for name in names:
            _check_name("--return", name, "Python names, such as model or model,losses")
        if "fabric" in names:
            raise UsageError("--return=fabric: the cell's fabric belongs to its ranks and does not come back; name what the cell bound")
        return names
    return None


def _check_name(flag: str, name: str, takes: str) -> None:
    """A UsageError unless `name` is one a notebook can bind and read back."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"{flag} takes {takes}; {name!r} is not one")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def _say_if_failed(label: str, error: BaseException | None) -> None:
    """Text output's end of a background run: a failure shows in its cell at once."""
    if error is not None and not isinstance(error, KeyboardInterrupt):  # a stop says so itself
        print(f"the background run {label} failed: {_first_line(error)}\n%fabric wait shows the whole error", file=sys.stderr)
