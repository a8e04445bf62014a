"""The TCP ports a process listens on, from /proc (no tool needed, works on a pod's
container process from the node)."""

from __future__ import annotations

import os
from pathlib import Path

LISTEN = "0A"


def listening_ports(pid: int, own_sockets_only: bool = True) -> set[int]:
    """TCP ports in LISTEN state in `pid`'s network namespace, IPv4 and IPv6; only those
    of `pid`'s own sockets with `own_sockets_only` (on a shared namespace, the host's)."""
    proc = Path(f"/proc/{pid}")
    inodes: set[str] | None = None
    if own_sockets_only:
        inodes = set()
        for fd in (proc / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = proc / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and (inodes is None or inode in inodes):
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
