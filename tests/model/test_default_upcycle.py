"""The upcycled default model against the dense SmolLM2 (transformers' GGUF loader)."""

from pathlib import Path

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.model.default import find_default_gguf
from afkv.model.model import load_colocated
from afkv.model.spec import UpcycleSpec
from tests.helpers import rel_err

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def dense_reference():
    pytest.importorskip("accelerate")
    import transformers

    gguf = find_default_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def upcycled(default_model_dir):
    return load_colocated(default_model_dir, torch.device("cpu"), torch.float32, UpcycleSpec())


def test_config_file_documents_the_builtin_defaults():
    cfg = EngineConfig.from_toml(CONFIGS / "default-model.toml")
    assert cfg.upcycle == UpcycleSpec()


def test_upcycled_logits_equal_dense(upcycled, dense_reference):
    from tests.model.test_families import _paged_logits

    ids = [1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]
    with torch.no_grad():
        ref = dense_reference(torch.tensor([ids])).logits[0]
    got = _paged_logits(upcycled, ids, [7, 13], block_size=4)
    assert rel_err(got, ref) <= 1e-4


def test_upcycled_layers_route_across_experts(upcycled):
    x = torch.randn(256, upcycled.spec.hidden_size)
    for layer in (0, 15, 29):
        r = upcycled.attn.route(layer, x)
        assert r.topk_ids.shape == (256, 2)
        counts = torch.bincount(r.topk_ids.flatten(), minlength=8)
        assert (counts > 0).all(), counts  # every expert gets tokens
        assert torch.allclose(r.topk_weights.sum(-1), torch.ones(256))
    # the MoE output equals the dense MLP's output, whatever the routing
    from afkv.ops.layers import gated_mlp

    r = upcycled.attn.route(3, x)
    mlp = upcycled.ffn.ffn.experts[3][0]
    got = upcycled.ffn.ffn.forward(3, r.x, r.topk_ids, r.topk_weights)
    assert rel_err(got, gated_mlp(r.x, mlp.gate_up, mlp.down)) < 1e-5


async def test_main_job_answers_with_real_text(default_model_dir, dense_reference):
    from transformers import GenerationConfig

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    async with Engine() as engine:
        r = await engine.complete(messages, SamplingParams(max_tokens=20))
        ids = r.prompt_token_ids
        assert "Paris" in r.text
        assert r.finish_reason == "stop"
        cfg = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2)
        with torch.no_grad():
            ref = dense_reference.generate(torch.tensor([ids]), generation_config=cfg)[0, len(ids):].tolist()
        assert r.token_ids == ref  # EOS included: both stop at <|im_end|>
        # stop strings end the text before the stop string
        s = await engine.complete(messages, SamplingParams(max_tokens=20, stop=["Paris"]))
        assert s.finish_reason == "stop" and "Paris" not in s.text and r.text.startswith(s.text)
        # plain-text prompts go through the tokenizer
        t = await engine.complete("The capital of France is", SamplingParams(max_tokens=5))
        assert t.text.strip()
