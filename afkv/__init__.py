"""afkv: serving Mixture-of-Experts models with Attention-FFN disaggregation.

    Engine            the async API over one process (colocated, or an attention node of a deployment)
    attach            the same API over a running deployment (afkv.serve.client)
    EngineConfig, SamplingParams, Completion, CompletionChunk, RequestMetrics, errors

Layer map, the one the code obeys (tests/test_layers.py parses every import under afkv/ and
fails on one against it); a layer imports only layers to its left, and its own package:

    errors <- ops, transport <- model <- kv <- config <- nodes <- engine <- serve <- cli

    errors     the exception hierarchy
    ops        tensor operations: torch references, Triton and CUDA kernels
    transport  between processes: control plane, data-plane peers (NCCL, host), streams
    model      the model split at the AF seam, checkpoints, tokenizers, CUDA graphs
    kv         the paged KV cache and the tiers below the device
    config     TOML configs, validated once
    nodes      a deployment's nodes: expert nodes, the attention node's links and data plane,
               placement, rendezvous
    engine     scheduler, model runner, the Engine API
    serve      above the engine: API server, attached clients, node processes, launcher
    cli        the `afkv` command
    eplb       a leaf: expert placement algorithms; reads only errors (model and above use it)
    plan       a leaf: `afkv plan`'s latency model; reads only model and below (cli and bench use it)
    bench      benchmarks, just under cli; nothing imports them (tests included)

ops, transport and eplb are siblings (none imports another); so are kv and plan. This
package (afkv/__init__.py) is the public API and sits above serve.
"""

from afkv.config import EngineConfig
from afkv.engine.engine import Engine, EngineState, EngineStats
from afkv.engine.params import Completion, CompletionChunk, RequestMetrics, SamplingParams
from afkv import errors
from afkv.serve.client import attach

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineState",
    "EngineStats",
    "SamplingParams",
    "Completion",
    "CompletionChunk",
    "RequestMetrics",
    "attach",
    "errors",
]
__version__ = "0.1.0"
