"""Tracebacks from ranks name notebook cells as IPython does (`Cell In[5], line 3`), not by the
kernel's file for the cell (/tmp/ipykernel_NNN/NNN.py)."""

from __future__ import annotations

import re
import sys
from typing import Any

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def label_cells(text: str) -> str:
    """`text` with each frame in a notebook cell named by the cell's number."""
    numbers = _cell_numbers()
    if not numbers:
        return text

    def label(match: re.Match) -> str:
        number = numbers.get(match.group(1))
        return match.group(0) if number is None else f"Cell In[{number}], line {match.group(2)}"

    return _FRAME.sub(label, text)


def place_label(filename: str, line: int) -> str:
    """"Cell In[5], line 3" for a line of a notebook cell, else "file.py, line 3"."""
    number = _cell_numbers().get(filename)
    return f"{filename}, line {line}" if number is None else f"Cell In[{number}], line {line}"


def label_place(place: str) -> str:
    """A place a rank named ("file, line 3"), named here: a process that did not run the notebook's
    cells (spawned, a pool's engine) cannot tell their numbers."""
    found = re.fullmatch(r"(.+), line (\d+)", place)
    return place_label(found.group(1), int(found.group(2))) if found else place


def label_error_cells(error: BaseException) -> None:
    """Rename the cell files in a RankError's message and traceback, in place."""
    if error.args and isinstance(error.args[0], str):
        error.args = (label_cells(error.args[0]), *error.args[1:])
    if isinstance(getattr(error, "rank_traceback", None), str):
        error.rank_traceback = label_cells(error.rank_traceback)


def _cell_numbers() -> dict[str, int]:
    """IPython's map from the file of each cell it compiled to the cell's number."""
    ipython = sys.modules.get("IPython")
    shell: Any = ipython.get_ipython() if ipython is not None else None
    return dict(getattr(getattr(shell, "compile", None), "_filename_map", None) or {})
