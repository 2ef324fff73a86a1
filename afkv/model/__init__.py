"""Models, split at the AF seam.

    spec.py      ModelSpec parsed from config.json (families, upcycling)
    weights.py   safetensors checkpoint reader (single, sharded)
    sides.py     AttentionSide | FFNSide: the two halves and their one-call interface
    model.py     the layer loop joining the halves through an FFN backend
    default.py   the embedded default model (SmolLM2-135M-Instruct GGUF -> HF checkpoint)
    tokenizer.py tokenizer and chat template of a checkpoint directory
    tiny.py      tiny random HF checkpoints of each family, for tests
Imports only afkv.ops and afkv.errors.
"""
