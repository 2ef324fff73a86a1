"""Serving a deployment: above the engine.

    api.py     ApiServer: an attention node's Engine served to remote clients
    client.py  AttachedEngine: the Engine API over the attention nodes of a deployment
    prefill.py PrefillServer: a prefill node's Engine serving KV hand-offs (afkv.nodes.handoff)
    node.py    one node process (attention, expert or prefill), from the torchrun/SLURM environment
    launch.py  Deployment / `afkv launch`: every node of a config as local processes
    http.py    OpenAIServer / `afkv serve`: the OpenAI API over HTTP (FastAPI on uvicorn) in front
               of an Engine or an AttachedEngine
    openai_schema.py  the OpenAI API's request models (pydantic) and response JSON
    metrics.py engine_samples (an engine's metrics, for /metrics and `afkv run --stats`) and
               ServerMetrics (Prometheus registry of the HTTP server)

    http uses openai_schema and metrics, and the Engine / AttachedEngine through their public API.
"""

from __future__ import annotations

import asyncio


def run_async(coro):
    """Run a coroutine on uvloop where installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
