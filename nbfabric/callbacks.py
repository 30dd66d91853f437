"""Calling a hook on the callbacks of a Fabric, as Lightning does: every callback that has it, each
given only the keyword arguments its signature takes."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

from nbfabric.tracebacks import users_stacklevel


def call_hook(callbacks: list[Any], hook_name: str, *args: Any, **kwargs: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook_name, None)
        if method is None:
            continue
        if not callable(method):
            warnings.warn(f"Skipping the callback `{type(callback).__name__}.{hook_name}` because it is not callable.", stacklevel=users_stacklevel())
            continue
        method(*args, **_accepted(method, kwargs))


def _accepted(method: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass everything
        return kwargs
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return kwargs
    names = {parameter.name for parameter in parameters}
    return {name: value for name, value in kwargs.items() if name in names}
