"""A rank's part of a run as one callable that launchers run as it is: in a forked rank, or pickled
for a fresh interpreter or a pool's engine (with cloudpickle, which carries notebook functions with
the globals they reach; a Fabric holding what cloudpickle cannot take, such as a logger with a lock,
with dill)."""

from __future__ import annotations

import pickle
from typing import Any, Callable

from nbfabric.launcher.shipping import dumps


class RankCall:
    """``fabric._run_as_rank(function, args, kwargs, finish)``, called with no arguments."""

    def __init__(self, fabric: Any, function: Callable[..., Any], args: tuple, kwargs: dict, finish: Callable[[Any, Any], Any] | None):
        self.fabric, self.function, self.args, self.kwargs, self.finish = fabric, function, args, kwargs, finish

    def __call__(self) -> Any:
        return self.fabric._run_as_rank(self.function, self.args, self.kwargs, self.finish)

    def __reduce__(self) -> tuple:
        try:
            fabric, by_dill = dumps(self.fabric), False
        except (TypeError, pickle.PicklingError, AttributeError):
            import dill

            fabric, by_dill = dill.dumps(self.fabric), True
        return _rebuild, (fabric, by_dill, dumps((self.function, self.args, self.kwargs, self.finish)))


def _rebuild(fabric: bytes, by_dill: bool, call: bytes) -> RankCall:
    if by_dill:
        import dill

        return RankCall(dill.loads(fabric), *pickle.loads(call))
    return RankCall(pickle.loads(fabric), *pickle.loads(call))
