"""Attention-node side of a deployment: find the expert nodes and connect the RemoteFFN."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from afkv.config import DeploymentConfig, EplbConfig
from afkv.errors import ConfigError
from afkv.model.spec import ModelSpec
from afkv.nodes.placement import initial_placement
from afkv.nodes.remote_ffn import RemoteFFN
from afkv.nodes.rendezvous import lookup, open_store

if TYPE_CHECKING:
    from afkv.nodes.nccl_ffn import NcclFFN


def uses_fixed_buffers(d: DeploymentConfig, device: torch.device) -> bool:
    """Whether an attention node on `device` uses the fixed-buffer data plane."""
    if d.data_plane == "auto":
        return device.type == "cuda"
    return d.data_plane == "fixed"


async def connect_expert_nodes(spec: ModelSpec, d: DeploymentConfig, rank: int, device: torch.device,
                               dtype: torch.dtype, executor, eplb: EplbConfig | None = None) -> "RemoteFFN | NcclFFN":
    """Find the expert nodes through the rendezvous store and connect to each: control plane
    always; with the fixed-buffer data plane (GPUs by default: NCCL) also its connections,
    made on `executor` (the model worker thread). The placement starts as every node
    computes it from the config (`initial_placement`)."""
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

    remote = RemoteFFN(placement, resolve, f"attention{rank}", d.token or None, d.expert_timeout_s,
                       asyncio.get_running_loop(), d.heartbeat_interval_s, executor=executor, rank=rank)
    await remote.connect()
    if not uses_fixed_buffers(d, device):
        return remote
    from afkv.nodes.nccl_ffn import NcclFFN

    try:
        return await NcclFFN.connect(remote, spec, store, rank, device, dtype, executor, d.dispatch_capacity, d.host)
    except BaseException:
        await remote.aclose()
        raise
