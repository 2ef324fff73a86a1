"""Models, split at the AF seam.

    spec.py      ModelSpec parsed from config.json (families, upcycling)
    weights.py   safetensors checkpoint reader (single, sharded)
    sides.py     AttentionSide | FFNSide: the two halves and their one-call interface
    random.py    random weights of real models' shapes (benchmarks, `afkv plan`)
    model.py     the layer loop joining the halves through an FFN backend
    graphs.py    CUDA graphs of the decode step
    default.py   the embedded default model (SmolLM2-135M-Instruct GGUF -> HF checkpoint)
    tokenizer.py tokenizer and chat template of a checkpoint directory
    tiny.py      tiny random HF checkpoints of each family and a Zipf-routed Mixtral, for tests

Layer map: spec, weights <- sides <- random, model <- graphs (random also reads spec). Reads afkv.ops, afkv.errors,
afkv.transport (device streams, for a remote FFN step inside a CUDA graph) and afkv.eplb
(the Zipf router of test checkpoints).
"""
