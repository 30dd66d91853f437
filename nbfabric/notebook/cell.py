"""A `%%fabric` cell: compiled in the notebook (errors before any rank starts), run in each rank."""

from __future__ import annotations

import ast
import linecache
from dataclasses import dataclass
from types import CodeType
from typing import Any

from nbfabric.notebook.returns import Returned, pack


@dataclass(frozen=True)
class Cell:
    """The cell's statements, its final expression (the cell's result) and the names it binds and reads."""

    body: CodeType
    last_expression: CodeType | None
    bound_names: tuple[str, ...]
    read_names: frozenset[str]
    filename: str
    source: str


def compile_cell(shell: Any, source: str) -> Cell:
    """Compile like IPython does, under a file name that tracebacks can show source lines for."""
    code = shell.transform_cell(source)
    filename = shell.compile.cache(code, shell.execution_count, raw_code=source)
    tree = ast.parse(code, filename)
    read = frozenset(node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load))
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";"):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval", flags=shell.compile.flags)
    names = tuple(bound_names(tree))
    body = compile(tree, filename, "exec", flags=shell.compile.flags)
    return Cell(body, last, names, read, filename, code)


def shippable_namespace(cell: Cell, namespace: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """For a spawned rank: the notebook values the cell reads that dill can pickle, and those it cannot."""
    import dill

    shipped, left = {}, []
    for name in sorted(cell.read_names & namespace.keys()):
        if dill.pickles(namespace[name]):
            shipped[name] = namespace[name]
        else:
            left.append(name)
    return shipped, left


def bound_names(tree: ast.Module) -> list[str]:
    """Names the cell binds at its top level (not inside functions, classes or comprehensions)."""
    names: dict[str, None] = {}

    class Binder(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Store):
                names[node.id] = None

        def visit_alias(self, node: ast.alias) -> None:
            if node.name != "*":
                names[node.asname or node.name.split(".")[0]] = None

        def _define(self, node) -> None:
            names[node.name] = None
            for decorator in node.decorator_list:
                self.visit(decorator)

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _define

        def _skip(self, node) -> None:
            pass

        visit_Lambda = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _skip

    Binder().visit(tree)
    return list(names)


def run_in_rank(fabric: Any, cell: Cell, namespace: dict[str, Any], names: list[str] | None) -> Returned | None:
    """Run the cell with `fabric` in the (forked) notebook namespace; rank 0 packs what goes back.

    `names`: what to bring back; None means every name the cell binds.
    """
    linecache.cache.setdefault(cell.filename, (len(cell.source), None, cell.source.splitlines(True), cell.filename))
    known = dict(namespace)
    namespace["fabric"] = fabric
    exec(cell.body, namespace)  # noqa: S102 - the user's own cell
    last_value = eval(cell.last_expression, namespace) if cell.last_expression is not None else None  # noqa: S307
    if fabric.global_rank != 0:
        return None
    wanted = [name for name in (cell.bound_names if names is None else names) if name != "fabric" and not name.startswith("_")]
    return pack(namespace, wanted, known, last_value)
