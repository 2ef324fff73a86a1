"""Reading Hugging Face safetensors checkpoints: single file, sharded index, or a set of files.

A `CheckpointReader` maps tensor names to files without reading any tensor;
`get` reads one tensor. Each side of the AF seam asks only for the tensors it owns.

FP8 checkpoints (DeepSeek-V3's format: `<name>` float8_e4m3fn with `<name>_scale_inv`, one
float32 scale per block of `fp8_block` weights): `get` with a dtype returns the dequantized
weight; `get` without one returns the stored tensor (what FFNSide takes as is for FP8 experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from afkv.errors import CheckpointError, ConfigError
from afkv.ops.fp8 import FP8, dequantize_blocks


class CheckpointReader:
    def __init__(self, model_dir: str | Path, fp8_block: tuple[int, int] | None = None):
        self.model_dir = Path(model_dir)
        self.fp8_block = fp8_block  # ModelSpec.fp8_block: how FP8 weights' scales are laid out
        if not self.model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.model_dir} does not exist")
        self._file_of: dict[str, Path] = {}  # tensor name -> file holding it
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"cannot read shard index {index}: {exc}") from exc
            for name, fname in weight_map.items():
                self._file_of[name] = self.model_dir / fname
            for path in set(self._file_of.values()):
                if not path.exists():
                    raise CheckpointError(f"shard {path.name} named in {index.name} is missing from {self.model_dir}")
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {self.model_dir}")
            for path in files:
                for name in self._open(path).keys():
                    self._file_of[name] = path
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint file {path} is unreadable or truncated: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor `name` on `device`; with a dtype, converted (FP8 weights dequantized first)."""
        tensor = self._read(name)
        if dtype is not None and tensor.dtype == FP8 and name + "_scale_inv" in self:
            if self.fp8_block is None:
                raise CheckpointError(f"{name!r} is fp8 with scales, but {self.model_dir}/config.json names no "
                                      "quantization_config.weight_block_size")
            scale = self._read(name + "_scale_inv")
            try:
                return dequantize_blocks(tensor.to(device), scale.to(device), dtype, self.fp8_block)
            except ConfigError as exc:
                raise CheckpointError(f"{name!r} in {self.model_dir}: {exc}") from exc
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def _read(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._open(path)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: file truncated or corrupt ({exc})") from exc
        return tensor

    def close(self) -> None:
        self._handles.clear()
