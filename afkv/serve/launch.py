"""Deployment: start every node of a deployment config as local processes (`afkv launch`).

The launcher hosts the rendezvous (afkv.nodes.rendezvous, on the deployment's host and
port) and starts one process per node with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set,
exactly as torchrun would on a cluster, plus AFKV_TOKEN: the deployment's shared token
(`[deployment] token`, else $AFKV_TOKEN, else a random one made up here, which
`Deployment.token` and `afkv launch` give to clients). Stopping sends SIGTERM, waits, then
kills.

Supervision (`supervise`, which `afkv launch` calls twice a second): a node process that
exits is started again after a backoff (backoff_s, doubling with each restart in the
window, at most max_backoff_s), at most max_restarts times per rank within window_s; one
more exit gives up (PeerLostError: `afkv launch` then stops the deployment). A restarted
expert node is used again by the attention nodes once it has registered; a restarted
attention node's clients reconnect on their next request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from afkv.config import EngineConfig
from afkv.errors import ConfigError, PeerLostError
from afkv.nodes.rendezvous import RendezvousServer, unpublish
from afkv.serve.client import NUM_ATTENTION_KEY

log = logging.getLogger("afkv.launch")

# Never let a node use NVLink multicast (it can take shared GPUs out of service).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # per rank within window_s; 0: never restart
    window_s: float = 600.0
    backoff_s: float = 1.0  # before the first restart in the window; doubles with each one
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_restarts, int) and self.max_restarts >= 0):
            raise ConfigError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}", key="max_restarts")
        for key in ("window_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}", key=key)


class Deployment:
    """`with Deployment(config_path, model) as dep:` -> dep.address ("host:port" to attach to).

    start_attention=False starts only the expert and prefill nodes (the attention nodes are then
    Engines created elsewhere with attention_rank=i, e.g. in the caller's process)."""

    def __init__(self, config_path: str | Path, model: str | Path | None = None, *, start_attention: bool = True,
                 ready_timeout_s: float = 120.0, log_dir: str | Path | None = None,
                 restart: RestartPolicy = RestartPolicy()):
        self.config_path = Path(config_path)
        self.config = EngineConfig.from_toml(self.config_path)
        if self.config.deployment is None:
            raise ConfigError("launching needs a [deployment] section", file=str(self.config_path), key="deployment")
        given = self.config.deployment.token or os.environ.get("AFKV_TOKEN", "")
        self.token_made_up = not given  # nobody knows it but us: `afkv launch` prints it
        self.token: str = given or secrets.token_urlsafe(32)
        self.model = str(model) if model else ""
        self.start_attention = start_attention
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[int, subprocess.Popen] = {}
        self.restart = restart
        self._restarts: dict[int, list[float]] = {}  # rank -> monotonic times of its restarts (supervise)
        self._due: dict[int, float] = {}  # rank -> when its process is started again
        self._back: set[int] = set()  # restarted ranks not yet registered again
        self._store = None

    @property
    def address(self) -> str:
        return f"{self.config.deployment.host}:{self._store.port}"

    @property
    def port(self) -> int:
        return self._store.port

    def attached_config(self) -> EngineConfig:
        """The config with this deployment's rendezvous port and token: for an
        `Engine(model, dep.attached_config(), attention_rank=i)` in this process."""
        d = dataclasses.replace(self.config.deployment, port=self.port, token=self.token)
        return dataclasses.replace(self.config, deployment=d)

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        d = self.config.deployment
        self._store = RendezvousServer(d.host, d.port, self.token).start()
        self._store.set(NUM_ATTENTION_KEY, str(d.attention_nodes))
        first = 0 if self.start_attention else d.attention_nodes
        try:
            for rank in range(first, d.world_size):
                self.start_node(rank)
            self.wait_ready("expert", d.expert_nodes)
            self.wait_ready("prefill", d.prefill_nodes)
            if self.start_attention:
                self.wait_ready("attention", d.attention_nodes)
        except BaseException:
            self.stop()
            raise

    def start_node(self, rank: int) -> None:
        """Start (or restart) the process of one rank."""
        d = self.config.deployment
        if rank in self.procs:  # a restart: lookups must wait for the new address
            unpublish(self._store, *self._role(rank))
        env = os.environ | SAFE_ENV | {
            "RANK": str(rank), "WORLD_SIZE": str(d.world_size), "MASTER_ADDR": d.host,
            "MASTER_PORT": str(self._store.port), "AFKV_CONFIG": str(self.config_path), "AFKV_MODEL": self.model,
            "AFKV_TOKEN": self.token, "AFKV_RENDEZVOUS": "launcher",
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

    def _role(self, rank: int) -> tuple[str, int]:
        return self.config.deployment.role(rank)

    def supervise(self) -> None:
        """Restart node processes that exited, within the restart policy (see the module
        docstring); PeerLostError once a rank exceeds it. Call it periodically."""
        now = time.monotonic()
        policy = self.restart
        for rank, p in list(self.procs.items()):
            if p.poll() is None:
                if rank in self._back and self._store.check([f"afkv/{'/'.join(map(str, self._role(rank)))}"]):
                    self._back.discard(rank)
                    log.warning("node %d (pid %d) registered again: serving", rank, p.pid)
                continue
            if rank in self._due:
                if now >= self._due[rank]:
                    del self._due[rank]
                    self.start_node(rank)
                    self._back.add(rank)
                    log.warning("restarted node %d (pid %d)", rank, self.procs[rank].pid)
                continue
            recent = self._restarts[rank] = [t for t in self._restarts.get(rank, []) if now - t < policy.window_s]
            if len(recent) >= policy.max_restarts:
                raise PeerLostError(f"node {rank} exited with code {p.returncode} after {len(recent)} restart(s) "
                                    f"within {policy.window_s:.0f} s; giving up")
            delay = min(policy.backoff_s * 2 ** len(recent), policy.max_backoff_s)
            recent.append(now)
            self._due[rank] = now + delay
            log.warning("node %d (pid %d) exited with code %d; restarting it in %.1f s (restart %d of at most %d "
                        "within %.0f s)", rank, p.pid, p.returncode, delay, len(recent), policy.max_restarts,
                        policy.window_s)

    def expert_rank(self, index: int) -> int:
        return self.config.deployment.attention_nodes + index

    def prefill_rank(self, index: int) -> int:
        d = self.config.deployment
        return d.attention_nodes + d.expert_nodes + index

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
        if self._store is not None:
            self._store.close()
