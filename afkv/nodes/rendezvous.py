"""Rendezvous through torch.distributed's TCPStore (no home-made cluster manager).

Keys: afkv/expert/{j} and afkv/attention/{i} hold "host:port" of each node's server.
The launcher (or the first process, RANK 0 on clusters) hosts the store; everybody
else connects as a client. TCPStore calls block: call them from a thread.
"""

from __future__ import annotations

from datetime import timedelta

from afkv.errors import PeerLostError


def open_store(host: str, port: int, is_master: bool, timeout_s: float = 60.0):
    from torch.distributed import TCPStore

    try:
        return TCPStore(host, port, is_master=is_master, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                        use_libuv=True)
    except (RuntimeError, OSError) as exc:
        role = "host" if is_master else "reach"
        raise PeerLostError(f"cannot {role} the rendezvous store at {host}:{port}: {exc}") from exc


def publish(store, role: str, index: int, host: str, port: int) -> None:
    store.set(f"afkv/{role}/{index}", f"{host}:{port}")


def unpublish(store, role: str, index: int) -> None:
    """Forget a node's address (before restarting it), so lookups wait for the new one."""
    store.delete_key(f"afkv/{role}/{index}")


def lookup(store, role: str, count: int, timeout_s: float, first: int = 0) -> list[tuple[str, int]]:
    """Addresses of nodes first..count-1 of `role`, waiting up to timeout_s for them to register."""
    keys = [f"afkv/{role}/{i}" for i in range(first, count)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise PeerLostError(f"{role} nodes did not register within {timeout_s:.0f} s: {exc}") from exc
    out = []
    for k in keys:
        host, _, port = store.get(k).decode().rpartition(":")
        out.append((host, int(port)))
    return out
