"""`afkv launch` (a real launcher process): it makes up a token when none is configured,
restarts a lost node within its restart policy and gives up past it."""

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

import afkv
from afkv import SamplingParams
from afkv.errors import AuthError
from tests.nodes.test_disaggregated import _write_config

BOUND_S = 120.0
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def _children(pid: int) -> dict[int, int]:
    """pid -> RANK of the node processes whose parent is `pid`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == pid else []
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        for var in env:
            if var.startswith(b"RANK="):
                out[int(entry.name)] = int(var[5:])
    return out


async def _line_with(stream: asyncio.StreamReader, text: str, seen: list[str]) -> str:
    async with asyncio.timeout(BOUND_S):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"the launcher ended without saying {text!r}; it said: {seen}")
            seen.append(line)
            if text in line:
                return line


async def test_launch_restarts_a_lost_expert_node_then_gives_up(tiny_dir, tmp_path):
    path = _write_config(tmp_path, 1, 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "afkv.cli", "launch", str(path), "--model", str(tiny_dir["mixtral"]),
        "--max-restarts", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"AFKV_TOKEN": ""})
    said: list[str] = []
    try:
        async with asyncio.timeout(BOUND_S):
            address = (await proc.stdout.readline()).decode().strip()
            token = (await proc.stdout.readline()).decode().strip()  # made up: no token configured
        assert address.startswith("127.0.0.1:") and len(token) >= 32
        with pytest.raises(AuthError):
            await afkv.attach(address, token="guess")
        async with await afkv.attach(address, token=token) as engine:
            assert len((await engine.complete([5, 6, 7], PARAMS)).token_ids) == 8
            [expert] = [pid for pid, rank in _children(proc.pid).items() if rank == 1]
            os.kill(expert, signal.SIGKILL)
            await _line_with(proc.stderr, "restarted node 1", said)
            assert "node 1 " in await _line_with(proc.stderr, "registered again", said)
            assert len((await engine.complete([5, 6, 7], PARAMS)).token_ids) == 8  # served by the new process
            [expert] = [pid for pid, rank in _children(proc.pid).items() if rank == 1]
            os.kill(expert, signal.SIGKILL)  # a second loss within the window: past --max-restarts 1
            await _line_with(proc.stderr, "giving up", said)
        async with asyncio.timeout(BOUND_S):
            assert await proc.wait() == 1
        assert _children(proc.pid) == {}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                for pid in _children(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                await proc.wait()
