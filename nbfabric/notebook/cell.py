"""A `%%fabric` cell: compiled in the notebook (errors before any rank starts), run in each rank."""

from __future__ import annotations

import ast
import builtins
import linecache
import sys
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

from nbfabric.launcher.shipping import Shipment, ship
from nbfabric.notebook.changes import changed_in_place, fingerprints, reached_names
from nbfabric.notebook.returns import Returned, pack


@dataclass(frozen=True)
class Cell:
    """The cell's statements, its final expression (the cell's result) and the names it binds,
    deletes (`del NAME`) and reads.

    `text` is the cell as the notebook shows it, its `%%fabric` line first, so that line numbers in
    tracebacks are the cell's own. It travels as text and is compiled again where it arrives."""

    text: str
    filename: str
    flags: int = 0
    body: CodeType = field(init=False, repr=False, compare=False)
    last_expression: CodeType | None = field(init=False, repr=False, compare=False)
    bound_names: tuple[str, ...] = field(init=False, compare=False)
    deleted_names: tuple[str, ...] = field(init=False, compare=False)
    imported_names: tuple[str, ...] = field(init=False, compare=False)  # bound by imports only
    read_names: frozenset[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        code = "\n" + self.text.split("\n", 1)[1]  # the magic line stays out, its line number in
        tree = ast.parse(code, self.filename)
        set_ = object.__setattr__
        set_(self, "read_names", frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)))
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
            last = compile(ast.Expression(tree.body.pop().value), self.filename, "eval", flags=self.flags)
        set_(self, "last_expression", last)
        bound, deleted, imported = top_level_names(tree)
        set_(self, "bound_names", tuple(bound))
        set_(self, "deleted_names", tuple(deleted))
        set_(self, "imported_names", tuple(imported))
        set_(self, "body", compile(tree, self.filename, "exec", flags=self.flags))

    def __reduce__(self) -> tuple:
        return Cell, (self.text, self.filename, self.flags)


def compile_cell(shell: Any, source: str, magic_line: str = "") -> Cell:
    """Compile like IPython does, under a file name that tracebacks can show source lines for."""
    text = f"%%fabric {magic_line}".rstrip() + "\n" + shell.transform_cell(source)
    filename = shell.compile.cache(text, cell_number(shell), raw_code=f"%%fabric {magic_line}\n{source}")
    return Cell(text, filename, shell.compile.flags)


def cell_number(shell: Any) -> int:
    """The running cell's number, as its In [n] prompt shows it."""
    result = getattr(shell.displayhook, "exec_result", None)
    return result.execution_count if result is not None else shell.execution_count


def values_for_ranks(cell: Cell, namespace: dict[str, Any], *, forked: bool, held: dict[str, Any] | None = None) -> dict[str, Any] | Shipment:
    """What the ranks get of the notebook's names: a forked rank has them all already; a rank in
    another interpreter gets those the cell reads, pickled, except names it holds (`held`: name ->
    the notebook's object when the rank last bound it, still current if the notebook kept it) and
    IPython's `get_ipython` (a pool's engine has its own)."""
    if forked:
        return namespace
    held = held or {}
    wanted = {
        name: namespace[name]
        for name in sorted(cell.read_names & namespace.keys())
        if (name not in held or namespace[name] is not held[name]) and not (name == "get_ipython" and uses_ipython(cell, namespace))
    }
    # a name the cell only deletes needs to exist there, not its value
    wanted.update({name: None for name in cell.deleted_names if name in namespace and name not in wanted and name not in held})
    return ship(wanted, _notebook_sources())


def uses_ipython(cell: Cell, namespace: dict[str, Any]) -> bool:
    """Whether the cell calls the notebook's IPython: a %magic or a !command (which IPython turns
    into get_ipython() calls), or get_ipython() itself."""
    value = namespace.get("get_ipython")
    return "get_ipython" in cell.read_names and getattr(value, "__name__", "") == "get_ipython" and hasattr(value, "__self__")


def _notebook_sources() -> list[str]:
    """The files of this kernel's cells (IPython's compile cache), for tracebacks in the ranks."""
    from IPython import get_ipython

    shell = get_ipython()
    names = getattr(getattr(shell, "compile", None), "_filename_map", {})
    return [name for name in names if name in linecache.cache]


def top_level_names(tree: ast.Module) -> tuple[list[str], list[str], list[str]]:
    """Names the cell binds, names it deletes (`del NAME`), and the bound names that only an import
    binds, at its top level (not inside functions, classes or comprehensions)."""
    names: dict[str, None] = {}
    deleted: dict[str, None] = {}
    imported: dict[str, None] = {}
    assigned: set[str] = set()

    class Binder(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Store):
                names[node.id] = None
                assigned.add(node.id)
            elif isinstance(node.ctx, ast.Del):
                deleted[node.id] = None

        def visit_alias(self, node: ast.alias) -> None:
            if node.name != "*":
                name = node.asname or node.name.split(".")[0]
                names[name] = imported[name] = None

        def _define(self, node) -> None:
            names[node.name] = None
            assigned.add(node.name)
            for decorator in node.decorator_list:
                self.visit(decorator)

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _define

        def _skip(self, node) -> None:
            pass

        visit_Lambda = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _skip

    Binder().visit(tree)
    return list(names), list(deleted), [name for name in imported if name not in assigned]


_rank_namespace: dict[str, Any] = {}  # per process: the names cells bound in this rank (kept between cells on a pool)


def rank_namespace() -> dict[str, Any]:
    """The namespace cells share in a rank of another interpreter (a pool's ranks keep it between cells)."""
    if not _rank_namespace:
        _rank_namespace.update(__name__="__main__", __builtins__=builtins)
        shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
        if shell is not None:  # a pool's engine: its own IPython runs the cell's magics and !commands
            _rank_namespace["get_ipython"] = shell.get_ipython
    return _rank_namespace


@dataclass
class Ran:
    """A cell's run on one rank: the namespace after it, the names it had before (`known`), the
    cell's last value, and the names whose values it changed in place (rank 0 looks)."""

    namespace: dict[str, Any]
    known: dict[str, Any]
    last_value: Any
    changed: list[str]


def run_in_rank(fabric: Any, cell: Cell, values: dict[str, Any] | Shipment) -> Ran:
    """Run the cell with `fabric` in the notebook's namespace (forked) or in this process's own,
    with the values shipped. Rank 0 fingerprints the values the cell can reach before, to find
    those it changed in place (they come back as the names it binds do)."""
    if isinstance(values, Shipment):
        namespace = rank_namespace()
        namespace.update(values.unpack())
    else:
        namespace = values
    linecache.cache.setdefault(cell.filename, (len(cell.text), None, cell.text.splitlines(True), cell.filename))
    known = dict(namespace)
    before = watch_values(namespace, cell) if fabric.global_rank == 0 else {}
    namespace["fabric"] = fabric
    exec(cell.body, namespace)  # noqa: S102 - the user's own cell
    last_value = eval(cell.last_expression, namespace) if cell.last_expression is not None else None  # noqa: S307
    return Ran(namespace, known, last_value, changed_in_place(namespace, known, before) if before else [])


def watch_values(namespace: dict[str, Any], cell: Cell) -> dict[str, bytes]:
    """Fingerprints of the notebook's values the cell can change: those of the names it reads and
    does not bind, and of the globals that the notebook functions it calls read."""
    return fingerprints(namespace, notebook_names(sorted(reached_names(cell.read_names, namespace) - set(cell.bound_names))))


def pack_for_notebook(cell: Cell, names: list[str] | None, fabric: Any, ran: Ran) -> Returned | None:
    """On rank 0, once the run's models are whole: the names to bring back (`names`; None means
    every name the cell binds, rebinds by other means, such as a function's `global`, or whose value
    it changed in place), and the last value, packed. Other ranks send nothing."""
    if fabric.global_rank != 0:
        return None
    namespace, known = ran.namespace, ran.known
    by_default = names is None
    if by_default:  # and the names it deleted: they go in the notebook too
        rebound = [name for name, value in namespace.items() if known.get(name, _UNBOUND) is not value]
        names = list(dict.fromkeys([*cell.bound_names, *rebound, *ran.changed]))
        deleted = [*(name for name in cell.deleted_names if name not in namespace), *(name for name in known if name not in namespace)]
        names = [name for name in names if name not in deleted]
    else:  # asked for by name (--return), private names too
        deleted = []
    returned = pack(namespace, notebook_names(names) if by_default else names, known, ran.last_value)
    returned.deleted = notebook_names(list(dict.fromkeys(deleted)))
    return returned


_UNBOUND = object()


def notebook_names(names: list[str]) -> list[str]:
    """The names that reach the notebook: not `fabric` (the cell's own), nor private ones."""
    return [name for name in names if name != "fabric" and not name.startswith("_")]


def pack_rank_name(name: str) -> Returned:
    """In a pool's rank: one name of the cells' namespace, packed as a cell's names come back."""
    return pack(rank_namespace(), [name], {})


def rank_holds(name: str) -> bool:
    """In a pool's rank: whether the cells' namespace binds `name`."""
    return name in rank_namespace()
