"""This machine as ranks use it: free ports, cores shared out as threads, the loopback interface."""

from __future__ import annotations

import ipaddress
import os
import socket


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for code in a rank that rendezvouses through env://."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_rank(local_world_size: int) -> int:
    """Intra-op threads for each rank: OMP_NUM_THREADS where the user set it (also after torch was
    imported, when torch no longer reads it), else the cores shared out."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, cpu_cores() // local_world_size)


def is_loopback(address: str) -> bool:
    """Whether `address` names this machine's loopback, so every node of the run is on this machine."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(address)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_sockets() -> dict[str, str]:
    """gloo and NCCL bound to loopback, unless the user chose interfaces: ranks that all run on this
    machine must not depend on what its hostname resolves to."""
    return {name: os.environ.get(name, "lo") for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
