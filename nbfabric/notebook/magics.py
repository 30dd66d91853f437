"""`%%fabric` runs a cell on N ranks; `%fabric` shows or sets the defaults for later cells."""

from __future__ import annotations

import sys
import time
from typing import Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from nbfabric.config import START_METHODS
from nbfabric.devices import detect_hardware
from nbfabric.fabric import Fabric
from nbfabric.launcher.output import TextSink
from nbfabric.notebook.cell import compile_cell, run_in_rank, shippable_namespace
from nbfabric.notebook.returns import LAST_VALUE
from nbfabric.record import RecordingSink, RunRecord

SETTINGS = ("accelerator", "devices", "strategy", "precision", "num_nodes", "start_method", "timeout", "ranks")
PER_CELL = ("return_names", "no_return", "out")


@magics_class
class FabricMagics(Magics):
    """Holds the defaults that `%fabric --flag=value` sets for later `%%fabric` cells."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.defaults: dict[str, Any] = {}

    @magic_arguments.magic_arguments()
    @magic_arguments.argument("--devices", help="number of ranks, or GPU indices such as 0,2 (default: auto)")
    @magic_arguments.argument("--accelerator", help="auto, cpu, cuda, gpu or mps (default: auto)")
    @magic_arguments.argument("--strategy", help="auto, ddp, ddp_notebook, ddp_fork or single_device")
    @magic_arguments.argument("--precision", help="32-true, 16-mixed, bf16-mixed, bf16-true, 16-true, 64-true")
    @magic_arguments.argument("--num-nodes", dest="num_nodes", help="number of machines (default: 1)")
    @magic_arguments.argument("--start-method", dest="start_method", help=f"{' or '.join(START_METHODS)} (default: fork)")
    @magic_arguments.argument("--timeout", type=float, help="stop every rank after this many seconds")
    @magic_arguments.argument("--ranks", help="whose output to show: all, 0, or a list such as 0,2 (default: all)")
    @magic_arguments.argument("--return", dest="return_names", help="bring back only these names, e.g. model,losses")
    @magic_arguments.argument("--no-return", dest="no_return", action="store_true", help="bring back no names")
    @magic_arguments.argument("--out", help="store the run record (output, metrics, exit codes) under this name")
    @line_cell_magic
    def fabric(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on every rank, with `fabric` (a launched Fabric) and the notebook's variables.

        Output streams back tagged "[rank N]"; the names the cell binds on rank 0 and its last
        expression come back into the notebook. As a line magic: with flags, set the defaults
        for later cells; without, show the defaults and the hardware found.
        """
        args = magic_arguments.parse_argstring(self.fabric, line)
        given = {name: value for name, value in vars(args).items() if value not in (None, False)}
        if cell is None:
            return self._set_or_show_defaults(given)
        settings = {**self.defaults, **{k: v for k, v in given.items() if k in SETTINGS}}
        fabric = _make_fabric(settings)
        ranks = _parse_ranks(settings.get("ranks", "all"), fabric.config.world_size)
        names = _wanted_names(args)
        compiled = compile_cell(self.shell, cell)
        record = RunRecord(fabric.config)
        sink = RecordingSink(record, TextSink(ranks=ranks, in_place_progress=True))
        if args.out:
            self.shell.user_ns[args.out] = record
        namespace = self.shell.user_ns
        if fabric.config.start_method == "spawn":
            namespace, left = shippable_namespace(compiled, namespace)
            if left:
                print(f"not sent to the spawned ranks (dill cannot pickle them): {', '.join(left)}", file=sys.stderr)
        try:
            returned = fabric.start_ranks(run_in_rank, (compiled, namespace, names), sink=sink)
        except BaseException as error:
            record.error = error
            raise
        finally:
            record.duration = time.time() - record.started
        values = returned.load() if returned is not None else {}
        last_value = values.pop(LAST_VALUE, None)
        self.shell.user_ns.update(values)
        if returned is not None and returned.skipped:
            skipped = ", ".join(f"{name} ({why})" for name, why in returned.skipped.items())
            print(f"not brought back from rank 0: {skipped}", file=sys.stderr)
        return last_value

    def _set_or_show_defaults(self, given: dict[str, Any]) -> None:
        per_cell = [f"--{name.replace('_names', '').replace('_', '-')}" for name in PER_CELL if name in given]
        if per_cell:
            raise UsageError(f"{', '.join(per_cell)} belongs on a %%fabric cell, not in the defaults")
        if given:
            settings = {**self.defaults, **given}
            _parse_ranks(settings.get("ranks", "all"), _make_fabric(settings).config.world_size)
            self.defaults = settings
        config = _make_fabric(self.defaults).config
        print(f"%%fabric defaults: {config.as_flags()}" + _extra_flags(self.defaults))
        print(f"hardware: {describe_hardware()}")


def describe_hardware() -> str:
    hardware = detect_hardware()
    gpus = ", ".join(
        f"cuda:{gpu.index} {gpu.name or 'GPU'}" + (f" ({gpu.memory_bytes / 1024**3:.0f} GiB)" if gpu.memory_bytes else "")
        for gpu in hardware.gpus
    )
    parts = [f"{hardware.cpu_count} CPU cores", gpus or "no CUDA GPU"]
    if hardware.mps:
        parts.append("Apple MPS")
    return "; ".join(parts)


def _make_fabric(settings: dict[str, Any]) -> Fabric:
    """A Fabric for these flag values; a bad value is a UsageError that lists the valid choices."""
    options = {name: settings[name] for name in SETTINGS[:6] if name in settings}
    try:
        return Fabric(**options, timeout=settings.get("timeout"))
    except ValueError as error:
        raise UsageError(str(error)) from None


def _extra_flags(settings: dict[str, Any]) -> str:
    extra = [f"--{name}={settings[name]}" for name in ("timeout", "ranks") if name in settings]
    return " " + " ".join(extra) if extra else ""


def _parse_ranks(value: str, world_size: int) -> set[int] | None:
    if value == "all":
        return None
    try:
        ranks = {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        ranks = set()
    if not ranks or not all(0 <= rank < world_size for rank in ranks):
        raise UsageError(f"--ranks={value!r} is not valid; use all, or ranks between 0 and {world_size - 1} such as 0 or 0,1")
    return ranks


def _wanted_names(args: Any) -> list[str] | None:
    if args.no_return and args.return_names:
        raise UsageError("--return and --no-return exclude each other")
    if args.no_return:
        return []
    if args.return_names:
        return [name.strip() for name in args.return_names.split(",") if name.strip()]
    return None
