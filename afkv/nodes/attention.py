"""Attention-node side of a deployment: find the expert nodes, link them, join the data plane."""

from __future__ import annotations

import asyncio

import torch

from afkv.config import DeploymentConfig, EplbConfig
from afkv.errors import ConfigError
from afkv.model.spec import ModelSpec
from afkv.nodes.links import ExpertLinks
from afkv.nodes.placement import initial_placement
from afkv.nodes.remote_ffn import RemoteFFN
from afkv.nodes.rendezvous import lookup, open_store


async def connect_expert_nodes(spec: ModelSpec, d: DeploymentConfig, rank: int, device: torch.device,
                               dtype: torch.dtype, executor, eplb: EplbConfig | None = None) -> RemoteFFN:
    """Find the expert nodes through the rendezvous store, connect to each (ExpertLinks) and
    join the data plane's peers with each, on `executor` (the model worker thread). The
    placement starts as every node computes it from the config (`initial_placement`)."""
    eplb = eplb or EplbConfig()
    try:
        placement = initial_placement(spec, d.expert_nodes, eplb.slots_per_node if eplb.enabled else 0)
    except ValueError as exc:
        raise ConfigError(str(exc), key="eplb.slots_per_node") from exc
    store = open_store(d.host, d.port, False, d.expert_timeout_s * 3, token=d.token or None)
    first = [True] * d.expert_nodes

    async def resolve(j: int) -> tuple[str, int]:
        # at start-up expert nodes may still be loading: wait longer than on a reconnect
        timeout_s = max(120.0, d.expert_timeout_s) if first[j] else d.expert_timeout_s
        first[j] = False
        [address] = await asyncio.to_thread(lookup, store, "expert", j + 1, timeout_s, j)
        return address

    links = ExpertLinks(placement, resolve, f"attention{rank}", d.token or None, d.expert_timeout_s,
                        asyncio.get_running_loop(), d.heartbeat_interval_s, executor=executor)
    await links.connect()
    try:
        return await RemoteFFN.connect(links, spec, store, rank, device, dtype, executor, d.dispatch_capacity, d.host)
    except BaseException:
        await links.aclose()
        raise
