"""One node process of a deployment: `python -m afkv.serve.node`.

Started by `afkv launch` or by torchrun/SLURM with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, plus AFKV_CONFIG (deployment TOML), AFKV_MODEL (checkpoint directory;
empty for the default model) and the deployment's shared token (`[deployment] token`, else
AFKV_TOKEN: a node refuses to start without one). Ranks 0..M-1 are attention (decode) nodes,
M..M+N-1 expert nodes, M+N..M+N+P-1 prefill nodes (afkv.nodes.handoff: a colocated engine
behind a PrefillServer). SIGTERM/SIGINT or a "shutdown" message stop it.

Rendezvous (afkv.nodes.rendezvous): at MASTER_ADDR:AFKV_RENDEZVOUS_PORT (default
MASTER_PORT; MASTER_PORT + 1 under torchrun, whose agent holds MASTER_PORT), hosted by rank
0 unless AFKV_RENDEZVOUS=launcher (`afkv launch` hosts it itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys

from afkv.config import EngineConfig
from afkv.engine.engine import Engine, resolve_device, resolve_dtype, resolve_model
from afkv.errors import AfkvError, ConfigError
from afkv.model.model import open_checkpoint
from afkv.nodes.expert import ExpertNode
from afkv.nodes.placement import initial_placement
from afkv.nodes.rendezvous import RendezvousServer, open_store, publish
from afkv.serve import run_async
from afkv.serve.api import ApiServer
from afkv.serve.client import NUM_ATTENTION_KEY
from afkv.serve.prefill import PrefillServer

log = logging.getLogger("afkv.node")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_expert(cfg: EngineConfig, model: str | None, index: int, store_host: str, store_port: int) -> None:
    d = cfg.deployment
    model_dir, upcycle = resolve_model(model, cfg, progress=False)
    spec, reader = open_checkpoint(model_dir, upcycle, cfg.model.expert_dtype)
    reader.close()
    device = resolve_device(d.expert_devices[index] if d.expert_devices else cfg.model.device)
    store = open_store(store_host, store_port, False, token=d.token)
    e = cfg.eplb
    try:
        placement = initial_placement(spec, d.expert_nodes, e.slots_per_node if e.enabled else 0)
    except ValueError as exc:
        raise ConfigError(str(exc), file=cfg.source, key="eplb.slots_per_node") from exc
    node = ExpertNode(spec, model_dir, placement, index, device, resolve_dtype(cfg.model.dtype, device), token=d.token,
                      host=d.host, store=store, peer_timeout_s=d.expert_timeout_s, window_s=e.window_s,
                      expert_batching=d.expert_batching)
    port = await node.start()
    await asyncio.to_thread(publish, store, "expert", index, d.host, port)
    log.info("expert node %d serving on %s:%d", index, d.host, port)
    stop = _stop_event()
    closed = asyncio.create_task(node.wait_closed())
    await asyncio.wait([closed, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    await node.aclose()


async def serve_attention(cfg: EngineConfig, model: str | None, index: int, store_host: str, store_port: int) -> None:
    d = cfg.deployment
    if d.attention_devices:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=d.attention_devices[index]))
    async with Engine(model, cfg, progress=False, attention_rank=index) as engine:
        api = ApiServer(engine, d.host, 0, token=d.token or None, client_timeout_s=d.client_timeout_s)
        port = await api.start()
        store = open_store(store_host, store_port, False, token=d.token)
        await asyncio.to_thread(publish, store, "attention", index, d.host, port)
        log.info("attention node %d serving on %s:%d", index, d.host, port)
        await _stop_event().wait()
        await api.aclose()


async def serve_prefill(cfg: EngineConfig, model: str | None, index: int, store_host: str, store_port: int) -> None:
    """A prefill node: the whole model in this process (colocated), serving KV hand-offs."""
    d = cfg.deployment
    device = d.prefill_devices[index] if d.prefill_devices else cfg.model.device
    local = dataclasses.replace(cfg, deployment=None, eplb=dataclasses.replace(cfg.eplb, enabled=False),
                                model=dataclasses.replace(cfg.model, device=device))
    async with Engine(model, local, progress=False) as engine:
        server = PrefillServer(engine, d.host, 0, token=d.token or None, client_timeout_s=d.client_timeout_s)
        port = await server.start()
        store = open_store(store_host, store_port, False, token=d.token)
        await asyncio.to_thread(publish, store, "prefill", index, d.host, port)
        log.info("prefill node %d serving on %s:%d", index, d.host, port)
        await _stop_event().wait()
        await server.aclose()


def main() -> int:
    logging.basicConfig(level=os.environ.get("AFKV_LOG", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store_host, store_port = os.environ["MASTER_ADDR"], _rendezvous_port()
        cfg = EngineConfig.from_toml(os.environ["AFKV_CONFIG"])
    except KeyError as exc:
        print(f"afkv node: environment variable {exc} is not set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, "
              "AFKV_CONFIG)", file=sys.stderr)
        return 2
    model = os.environ.get("AFKV_MODEL") or None
    log.info("node %d of %d starting (config %s, model %s, store %s:%d)", rank, world, os.environ["AFKV_CONFIG"],
             model or "default", store_host, store_port)
    if "OMP_NUM_THREADS" not in os.environ and not cfg.model.cpu_threads:  # nodes of one machine share its cores
        import torch

        share = max(1, (os.cpu_count() or 1) // max(world, 1))
        torch.set_num_threads(share)  # an expert node's threads
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cpu_threads=share))  # an attention node's
    try:
        d = cfg.deployment
        if d is None:
            raise ConfigError("a node needs a [deployment] section", file=os.environ["AFKV_CONFIG"], key="deployment")
        if world != d.world_size:
            raise ConfigError(f"WORLD_SIZE is {world} but the deployment has {d.world_size} nodes",
                              file=os.environ["AFKV_CONFIG"], key="deployment")
        token = d.token or os.environ.get("AFKV_TOKEN", "")
        if not token:
            raise ConfigError("a node needs the deployment's shared token: set AFKV_TOKEN (the same on every node) "
                              "or [deployment] token; `afkv launch` makes one up", file=os.environ["AFKV_CONFIG"],
                              key="deployment.token")
        # the store address comes from the environment: it wins over the config's host/port
        cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(d, port=store_port, token=token))
        hosted = None
        if rank == 0 and os.environ.get("AFKV_RENDEZVOUS") != "launcher":
            hosted = RendezvousServer(store_host, store_port, token).start()
            hosted.set(NUM_ATTENTION_KEY, str(d.attention_nodes))
        try:
            role, index = d.role(rank)
            serve = {"attention": serve_attention, "expert": serve_expert, "prefill": serve_prefill}[role]
            coro = serve(cfg, model, index, store_host, store_port)
            run_async(coro)
            log.info("node %d stopped", rank)
        finally:
            if hosted is not None:
                hosted.close()
    except AfkvError as exc:
        print(f"afkv node {rank}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _rendezvous_port() -> int:
    if "AFKV_RENDEZVOUS_PORT" in os.environ:
        return int(os.environ["AFKV_RENDEZVOUS_PORT"])
    under_torchrun = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return int(os.environ["MASTER_PORT"]) + (1 if under_torchrun else 0)


if __name__ == "__main__":
    sys.exit(main())
