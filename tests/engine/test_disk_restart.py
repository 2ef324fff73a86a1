"""A disk tier written by one process is reused by the next: block hashes, the index and the
files survive a real restart (another interpreter, another seed for Python's hash())."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from afkv import Engine, EngineConfig, SamplingParams
from tests.helpers import random_prompt

ROOT = Path(__file__).resolve().parents[2]

_FIRST = """
import asyncio, json, sys
from afkv import Engine, EngineConfig, SamplingParams
from tests.helpers import random_prompt

model, cfg, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

async def main():
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    async with Engine(model, EngineConfig.from_dict(cfg), progress=False) as engine:
        out = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, params) for p in prompts))]
        for i in range(6):  # other prompts push the first ones out of the device and host tiers
            await engine.complete(random_prompt(40, 256, seed=900 + i), params)
        await engine.kv_manager.aclose()  # writes the disk index
        spills = engine.kv_metrics().counters["spills"]
    print(json.dumps({"tokens": out, "spills": spills}))

asyncio.run(main())
"""


def test_a_new_process_reuses_the_disk_tier(tiny_dir, tmp_path):
    cfg = {"kv": {"block_size": 4, "num_blocks": 16, "host_num_blocks": 8, "disk_path": str(tmp_path / "spill"),
                  "disk_num_blocks": 400},
           "scheduler": {"max_num_batched_tokens": 32, "max_num_seqs": 4}}
    prompts = [random_prompt(24, 256, seed=100) + random_prompt(8 + i, 256, seed=i) for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "777"}
    child = subprocess.run([sys.executable, "-c", _FIRST, str(tiny_dir["llama"]), json.dumps(cfg), json.dumps(prompts)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    first = json.loads(child.stdout.strip().splitlines()[-1])
    assert first["spills"] > 0

    async def again():
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        async with Engine(tiny_dir["llama"], EngineConfig.from_dict(cfg), progress=False) as engine:
            out = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            hits = engine.kv_metrics().hit_blocks["disk"]
            await engine.kv_manager.aclose()
            return out, hits

    out, disk_hits = asyncio.run(again())
    assert [r.token_ids for r in out] == first["tokens"]
    assert disk_hits > 0
    # every full prompt block of the first request was cached: 24 + 8 tokens = 8 blocks of 4
    assert out[0].metrics.num_cached_tokens >= 28
