"""Deployment: start every node of a deployment config as local processes (`afkv launch`).

The launcher hosts the rendezvous store (torch.distributed TCPStore) and starts one
process per node with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, exactly as
torchrun would on a cluster. Stopping sends SIGTERM, waits, then kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from afkv.config import EngineConfig
from afkv.errors import ConfigError, PeerLostError
from afkv.nodes.rendezvous import open_store, unpublish
from afkv.serve.client import NUM_ATTENTION_KEY

# Never let a node use NVLink multicast (it can take shared GPUs out of service).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Deployment:
    """`with Deployment(config_path, model) as dep:` -> dep.address ("host:port" to attach to).

    start_attention=False starts only the expert nodes (the attention nodes are then
    Engines created elsewhere with attention_rank=i, e.g. in the caller's process)."""

    def __init__(self, config_path: str | Path, model: str | Path | None = None, *, start_attention: bool = True,
                 ready_timeout_s: float = 120.0, log_dir: str | Path | None = None):
        self.config_path = Path(config_path)
        self.config = EngineConfig.from_toml(self.config_path)
        if self.config.deployment is None:
            raise ConfigError("launching needs a [deployment] section", file=str(self.config_path), key="deployment")
        self.model = str(model) if model else ""
        self.start_attention = start_attention
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[int, subprocess.Popen] = {}
        self._store = None

    @property
    def address(self) -> str:
        return f"{self.config.deployment.host}:{self._store.port}"

    @property
    def port(self) -> int:
        return self._store.port

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        d = self.config.deployment
        self._store = open_store(d.host, d.port, is_master=True)
        self._store.set(NUM_ATTENTION_KEY, str(d.attention_nodes))
        first = 0 if self.start_attention else d.attention_nodes
        try:
            for rank in range(first, d.world_size):
                self.start_node(rank)
            self.wait_ready("expert", d.expert_nodes)
            if self.start_attention:
                self.wait_ready("attention", d.attention_nodes)
        except BaseException:
            self.stop()
            raise

    def start_node(self, rank: int) -> None:
        """Start (or restart) the process of one rank."""
        d = self.config.deployment
        if rank in self.procs:  # a restart: lookups must wait for the new address
            role, index = ("attention", rank) if rank < d.attention_nodes else ("expert", rank - d.attention_nodes)
            unpublish(self._store, role, index)
        env = os.environ | SAFE_ENV | {
            "RANK": str(rank), "WORLD_SIZE": str(d.world_size), "MASTER_ADDR": d.host,
            "MASTER_PORT": str(self._store.port), "AFKV_CONFIG": str(self.config_path), "AFKV_MODEL": self.model,
        }
        out = None
        if self.log_dir is not None:
            env.setdefault("AFKV_LOG", "INFO")  # a node log records start-up, joins and losses
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"node{rank}.log", "ab")
        self.procs[rank] = subprocess.Popen([sys.executable, "-m", "afkv.serve.node"], env=env, stdout=out,
                                            stderr=subprocess.STDOUT if out else None)
        if out is not None:
            out.close()

    def expert_rank(self, index: int) -> int:
        return self.config.deployment.attention_nodes + index

    def wait_ready(self, role: str, count: int) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            for rank, p in self.procs.items():
                if p.poll() is not None:
                    raise PeerLostError(f"node {rank} exited with code {p.returncode} during start-up")
            if self._store.check([f"afkv/{role}/{i}" for i in range(count)]):
                return
            if time.monotonic() > deadline:
                raise PeerLostError(f"{role} nodes did not register within {self.ready_timeout_s:.0f} s")
            time.sleep(0.05)

    def kill_node(self, rank: int) -> None:
        """SIGKILL one node (fault injection) and reap it."""
        p = self.procs[rank]
        p.kill()
        p.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
