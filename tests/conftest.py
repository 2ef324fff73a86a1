import os

import pytest
import torch

FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # MLA families: a latent KV cache (tests/model/test_deepseek*.py)

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. It must be
    # chosen before triton is first imported, whichever test module imports it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # CI runs two pytest-xdist workers on two cores: one torch thread each
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


_STICKY_CUDA_ERRORS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """A sticky CUDA error (an illegal address, say) leaves this process's CUDA context unusable:
    every later GPU test of the process would fail with it. Under pytest-xdist the worker ends
    right after reporting the failure, and xdist starts a fresh one for the rest of the tests,
    so one kernel fault shows as one failure (found on the H100: one int4 prefill fault failed a
    worker's 28 later tests)."""
    if (report.failed and os.environ.get("PYTEST_XDIST_WORKER") and torch.cuda.is_available()
            and any(e in str(report.longrepr) for e in _STICKY_CUDA_ERRORS)):
        os._exit(3)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never write to the user's cache: the default model converts into a session directory."""
    old = os.environ.get("AFKV_CACHE_DIR")
    os.environ["AFKV_CACHE_DIR"] = str(tmp_path_factory.mktemp("afkv-cache"))
    yield
    if old is None:
        os.environ.pop("AFKV_CACHE_DIR", None)
    else:
        os.environ["AFKV_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> directory of a tiny random HF checkpoint written by transformers."""
    from afkv.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: write_tiny_checkpoint(fam, root / fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory):
    """family -> directory of a tiny random DeepSeek-V2 / V3 checkpoint written by transformers."""
    from afkv.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-deepseek")
    return {fam: write_tiny_checkpoint(fam, root / fam, seed=10 + i) for i, fam in enumerate(DEEPSEEK)}


@pytest.fixture(scope="session")
def tiny_text_dir(tiny_dir, tmp_path_factory):
    """The tiny Mixtral checkpoint with a byte-level tokenizer (text prompts: one token per byte)."""
    import shutil

    from tests.helpers import write_byte_tokenizer

    out = tmp_path_factory.mktemp("tiny-text") / "mixtral"
    shutil.copytree(tiny_dir["mixtral"], out)
    write_byte_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def default_model_dir():
    from afkv.model.default import ensure_default_checkpoint

    return ensure_default_checkpoint(progress=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, default_model_dir):
    """A tiny random llama with the default model's tokenizer and chat template (vocab 49152):
    text and chat prompts at the cost of a tiny model; its sampled outputs cover the whole
    vocabulary (byte tokens that split multi-byte characters included)."""
    import shutil

    from afkv.model.tiny import write_tiny_checkpoint
    from afkv.model.tokenizer import Tokenizer

    vocab = Tokenizer(default_model_dir).vocab_size
    out = write_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-chat") / "llama", seed=7, vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, out / name)
    return out
