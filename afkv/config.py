"""Engine configuration: frozen dataclasses, loaded from TOML and validated once.

    [model]      path, dtype, device
    [upcycle]    sparse upcycling of a dense Llama checkpoint (the default model)
    [kv]         block_size, num_blocks / device_memory_mib
    [scheduler]  max_num_seqs, max_num_batched_tokens, max_model_len

Unknown sections or keys and impossible values raise ConfigError naming file and key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from afkv.errors import ConfigError
from afkv.model.spec import UpcycleSpec


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory; "" = the embedded default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class KVConfig:
    block_size: int = 16  # tokens per block
    num_blocks: int = 0  # 0: derived from device_memory_mib
    device_memory_mib: int = 256  # KV bytes on the device tier when num_blocks is 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step; longer prompts are prefilled in chunks
    max_model_len: int = 0  # 0: the model's max_position_embeddings


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    upcycle: UpcycleSpec | None = None  # None: the default model gets UpcycleSpec(); others stay dense
    kv: KVConfig = field(default_factory=KVConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_toml(cls, path: str | Path) -> "EngineConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError("config file not found", file=str(path)) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", file=str(path)) from exc
        cfg = cls.from_dict(data, source=str(path))
        if cfg.model.path and not Path(cfg.model.path).is_absolute():
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path.parent / cfg.model.path)))
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "EngineConfig":
        sections = {"model": ModelConfig, "upcycle": UpcycleSpec, "kv": KVConfig, "scheduler": SchedulerConfig}
        kwargs = {}
        for name, value in data.items():
            if name not in sections:
                raise ConfigError(f"unknown section [{name}]; known: {', '.join(sections)}", file=source, key=name)
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table", file=source, key=name)
            kwargs[name] = _build(sections[name], value, name, source)
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str | None = None) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, file=source, key=key)

        need(self.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
             f"dtype must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        need(self.model.device == "auto" or self.model.device == "cpu" or self.model.device.startswith("cuda"),
             "model.device", f"device must be auto, cpu or cuda[:N], got {self.model.device!r}")
        need(self.kv.block_size > 0, "kv.block_size", f"block_size must be positive, got {self.kv.block_size}")
        need(self.kv.num_blocks >= 0, "kv.num_blocks", f"num_blocks must be >= 0, got {self.kv.num_blocks}")
        need(self.kv.device_memory_mib > 0, "kv.device_memory_mib", "device_memory_mib must be positive")
        need(self.scheduler.max_num_seqs > 0, "scheduler.max_num_seqs", "max_num_seqs must be positive")
        need(self.scheduler.max_num_batched_tokens > 0, "scheduler.max_num_batched_tokens",
             "max_num_batched_tokens must be positive")
        need(self.scheduler.max_model_len >= 0, "scheduler.max_model_len", "max_model_len must be >= 0")


def _build(cls, values: dict[str, Any], section: str, source: str | None):
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key; [{section}] takes {', '.join(known)}", file=source, key=f"{section}.{key}")
        expected = known[key].type
        want = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(expected if isinstance(expected, str) else expected.__name__)
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise ConfigError(f"expected {expected}, got {value!r}", file=source, key=f"{section}.{key}")
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key=section) from exc
