"""Nodes started as torchrun/SLURM would start them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, AFKV_TOKEN): rank 0 hosts the rendezvous there, and a node without a token
refuses to start."""

import asyncio
import os
import socket
import subprocess
import sys

import afkv
from afkv import SamplingParams
from afkv.nodes.rendezvous import RendezvousClient
from tests.nodes.test_disaggregated import _write_config

BOUND_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(path, model, rank: int, port: int, token: str) -> dict:
    return os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "AFKV_CONFIG": str(path), "AFKV_MODEL": str(model), "AFKV_TOKEN": token}


async def test_rank_0_hosts_the_rendezvous(tiny_dir, tmp_path):
    path = _write_config(tmp_path, 1, 1)
    port, token = _free_port(), "cluster-token-0123456789"
    # the expert node (rank 1) first: it waits for rank 0's rendezvous to come up
    procs = [subprocess.Popen([sys.executable, "-m", "afkv.serve.node"],
                              env=_env(path, tiny_dir["mixtral"], rank, port, token)) for rank in (1, 0)]
    try:
        # as nodes do: wait for rank 0's rendezvous to come up, then for the attention node to register
        rendezvous = RendezvousClient("127.0.0.1", port, token, timeout_s=BOUND_S, wait_for_server=True)
        await asyncio.to_thread(rendezvous.wait, ["afkv/attention/0"], BOUND_S)
        async with await afkv.attach(f"127.0.0.1:{port}", token=token) as engine:
            done = await engine.complete([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
            assert len(done.token_ids) == 4
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_a_node_without_a_token_refuses_to_start(tiny_dir, tmp_path):
    path = _write_config(tmp_path, 1, 1)
    env = _env(path, tiny_dir["mixtral"], 1, _free_port(), "")
    out = subprocess.run([sys.executable, "-m", "afkv.serve.node"], env=env, capture_output=True, text=True,
                         timeout=BOUND_S)
    assert out.returncode == 2 and "AFKV_TOKEN" in out.stderr
