"""The engine: async API, scheduler, model runner.

    params.py     SamplingParams, CompletionChunk, Completion, RequestMetrics
    sequence.py   Sequence: one request's state
    scheduler.py  Scheduler: continuous batching, chunked prefill, preemption
    runner.py     ModelRunner: one step on the model worker thread
    engine.py     Engine: lifecycle, request admission, the step loop
Imports afkv.kv, afkv.model, afkv.ops.
"""
