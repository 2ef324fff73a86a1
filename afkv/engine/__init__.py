"""The engine: async API, scheduler, model runner.

    params.py     SamplingParams, CompletionChunk, Completion, RequestMetrics
    sequence.py   Sequence: one request's state (the scheduler's)
    runner.py     ModelRunner: one step on the model worker thread
    scheduler.py  Scheduler: continuous batching, chunked prefill, preemption; the only place
                  a sequence changes (postprocess, finish, abort, fail)
    engine.py     Engine: lifecycle, request admission, the step loop

Layer map: params <- sequence, runner <- scheduler <- engine. Reads afkv.nodes (the attention
side of a deployment), afkv.config, afkv.kv, afkv.model, afkv.ops and afkv.errors; serving
(afkv.serve, afkv.attach) sits above it.
"""
