"""afkv: serving Mixture-of-Experts models with Attention-FFN disaggregation.

Layer map (lower layers never import upper ones):
    ops  <-  model  <-  kv  <-  nodes / transport  <-  engine  <-  cli
"""

from afkv.config import EngineConfig
from afkv.engine.engine import Engine, EngineState, EngineStats
from afkv.engine.params import Completion, CompletionChunk, RequestMetrics, SamplingParams
from afkv import errors

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineState",
    "EngineStats",
    "SamplingParams",
    "Completion",
    "CompletionChunk",
    "RequestMetrics",
    "errors",
]
__version__ = "0.1.0"
