"""The key-value store the ranks of one machine meet through, kept by the supervisor; its
requests are also those of the keyed store of a run on several nodes (`keyed_store`).

Each rank reaches it over its own socket (`store_client.SupervisorStore` on the rank's side): one
end of a socket pair that the rank inherits as it starts. It listens on no port and has no
address, so no other process can reach it, and it needs no key.
A request is a frame `(request_id, op, args)`; the answer, `(request_id, value)`, is sent as soon
as it is known: `get` and `wait` are answered the moment another rank sets the key, where a file
store would look again every 10 ms and a TCP store would need a server thread and a free port.
"""

from __future__ import annotations

from typing import Any, Callable

Reply = Callable[[int, Any], None]  # (request_id, value) back to the rank that asked


def finished_key(rank: int) -> str:
    """Set once `rank` has done its part of the run, by the rank or, once it has ended, the supervisor."""
    return f"nbfabric/finished/{rank}"


class StoreServer:
    """The store's data, and the requests that wait for keys not yet set."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self._waiting: list[tuple[int, list[str], bool, int, Reply]] = []  # (rank, keys, is_get, id, reply)

    def handle(self, rank: int, request: tuple[int, str, tuple], reply: Reply) -> None:
        request_id, op, args = request
        if op in ("get", "wait"):
            keys = [args[0]] if op == "get" else list(args[0])
            self._waiting.append((rank, keys, op == "get", request_id, reply))
            self._answer_ready()
            return
        reply(request_id, self._apply(op, args))
        if op in ("set", "add", "compare_set"):
            self._answer_ready()

    def forget(self, rank: int) -> None:
        """Drop the waiting requests of a rank that is gone."""
        self._waiting = [entry for entry in self._waiting if entry[0] != rank]

    def rank_ended(self, rank: int) -> None:
        """A rank that has ended is finished for its peers that wait for it (`finished_key`)."""
        self.forget(rank)
        self.data[finished_key(rank)] = b""
        self._answer_ready()

    def _apply(self, op: str, args: tuple) -> Any:
        data = self.data
        if op == "set":
            data[args[0]] = bytes(args[1])
            return None
        if op == "add":
            value = int(data.get(args[0], b"0")) + int(args[1])
            data[args[0]] = str(value).encode()
            return value
        if op == "compare_set":
            key, expected, desired = args[0], bytes(args[1]), bytes(args[2])
            current = data.get(key)
            if (current is None and not expected) or current == expected:
                data[key] = desired
                return desired
            return expected if current is None else current
        if op == "check":
            return all(key in data for key in args[0])
        if op == "delete_key":
            return data.pop(args[0], None) is not None
        if op == "num_keys":
            return len(data)
        return ValueError(f"the rendezvous store has no operation {op!r}")

    def _answer_ready(self) -> None:
        still_waiting = []
        for entry in self._waiting:
            _, keys, is_get, request_id, reply = entry
            if all(key in self.data for key in keys):
                reply(request_id, self.data[keys[0]] if is_get else None)
            else:
                still_waiting.append(entry)
        self._waiting = still_waiting
