"""How a failure is told: an exception's message and traceback as the user's own frames, and
errors that IPython shows as their message alone."""

from __future__ import annotations

import os
import sys
import traceback

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ShortInIPython:
    """Mixed into an exception: in IPython, show its message only (nbfabric's frames say nothing to the user)."""

    def _render_traceback_(self) -> list[str]:
        return f"{type(self).__name__}: {self}".splitlines()


def shown_briefly(error: BaseException) -> BaseException:
    """A stop (Stop button, interrupt) shows in IPython as one line, not as nbfabric's frames."""
    if isinstance(error, KeyboardInterrupt):
        error._render_traceback_ = lambda: [f"KeyboardInterrupt: {error}"]
    return error


def users_stacklevel() -> int:
    """The `stacklevel` for a `warnings.warn` in the caller that points at the user's line: the first
    frame outside nbfabric and IPython (a %%fabric cell's magic line is in the cell's own frame)."""
    ipython = sys.modules.get("IPython")
    not_the_users = (PACKAGE_DIR, *([os.path.dirname(ipython.__file__) + os.sep] if ipython else []))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(not_the_users):
        frame, level = frame.f_back, level + 1
    return level


def user_traceback(exc: BaseException) -> str:
    """The traceback of `exc` without the frames of nbfabric (and runpy) that led into the user's code."""
    summary = traceback.TracebackException.from_exception(exc)
    frames = list(summary.stack)
    while len(frames) > 1 and (frames[0].filename.startswith(PACKAGE_DIR) or _is_runpy(frames[0].filename)):
        frames.pop(0)
    summary.stack = traceback.StackSummary.from_list(frames)
    return "".join(summary.format())


def exception_message(exc: BaseException) -> str:
    """str(exc), or a note where the exception's own __str__ fails."""
    try:
        return str(exc)
    except Exception as error:  # noqa: BLE001 - the exception's own __str__ failed
        return f"<its message could not be made: {type(error).__name__} in __str__>"


def raised_by_torch_distributed(exc: BaseException) -> bool:
    """Whether torch.distributed raised it (often a consequence of another rank's failure): its type,
    the innermost frame it was raised in, or gloo's words for a peer that went away."""
    module = type(exc).__module__ or ""
    frames = traceback.extract_tb(exc.__traceback__)
    innermost = frames[-1].filename.replace(os.sep, "/") if frames else ""
    message = exception_message(exc)
    return (
        module.startswith("torch.distributed")
        or "/torch/distributed/" in innermost
        or any(words in message for words in ("Connection closed by peer", "Connection reset by peer"))
    )


def _is_runpy(filename: str) -> bool:
    """Frames of runpy, which `nbfabric run` uses to start the user's script."""
    return filename == "<frozen runpy>" or os.path.basename(filename) == "runpy.py"
