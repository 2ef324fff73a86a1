"""Engine configuration: frozen dataclasses, loaded from TOML and validated once.

    [model]      path, dtype, device, cuda_graphs, expert_dtype
    [upcycle]    sparse upcycling of a dense Llama checkpoint (the default model)
    [kv]         block_size, num_blocks / device_memory_mib, device_format / fp_window,
                 stream_memory_mib / stream_num_blocks, stream_sink_tokens, stream_window, stream_ahead,
                 stream_disk_mib / stream_disk_num_blocks, stream_disk_path
                 (quantized device tier); tiers below the device: host_*, disk_*,
                 spill_format, eviction, prefetch_depth, io_threads
    [kv.pruning] policy (none | streaming | h2o), num_sink_tokens, window, budget
    [scheduler]  max_num_seqs, max_num_batched_tokens, max_model_len, max_prompt_chars
    [deployment] attention (decode) / expert / prefill node counts, micro-batches, rendezvous,
                 token, timeouts
    [eplb]       expert load balancing across expert nodes (needs [deployment])

Unknown sections or keys and impossible values raise ConfigError naming file and key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from afkv.errors import ConfigError
from afkv.kv.device import DeviceQuant, staging_blocks_needed
from afkv.kv.formats import FORMAT_NAMES, make_format
from afkv.kv.layout import Layout
from afkv.kv.pruning import KVPruning
from afkv.kv.stream import StreamConfig
from afkv.kv.tiers.config import TierConfig
from afkv.kv.tiers.disk import HEADER_NBYTES
from afkv.kv.tiers.policy import EVICTION_POLICIES
from afkv.model.spec import EXPERT_DTYPES, UpcycleSpec


DEVICE_FORMAT_NAMES = ("auto", *FORMAT_NAMES[1:])


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory; "" = the embedded default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA, colocated, triton installed)
    expert_dtype: str = "auto"  # auto (the model dtype) | fp8: routed experts as e4m3 with 128 x 128 block scales
    # torch intra-op threads of the engine's model thread on a CPU device (torch.set_num_threads there;
    # torch keeps it for threads started later); 0: auto, one core left to the event loop and the rest
    # of the process (default_cpu_threads). Why: README, "CPU threads on a shared machine".
    cpu_threads: int = 0


def default_cpu_threads() -> int:
    """OMP_NUM_THREADS when set (the user's choice); else the cores this process may run on,
    less one for the event loop, tokenizer and server threads (at least one): parallel regions
    of the model thread then do not wait on a core that other work holds."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass(frozen=True)
class KVConfig:
    """The paged KV cache: device tier, then (optional) host memory, then (optional) disk.
    A host or disk tier exists when it has a size; `*_num_blocks` overrides `*_mib`."""

    block_size: int = 16  # tokens per block
    num_blocks: int = 0  # 0: derived from device_memory_mib
    device_memory_mib: int = 256  # KV bytes on the device tier when num_blocks is 0
    host_memory_mib: int = 0  # host tier (pinned memory on GPU machines)
    host_num_blocks: int = 0
    disk_path: str = ""  # private spill directory (created 0700, files 0600; ~ expanded)
    disk_capacity_mib: int = 0  # disk tier; needs a host tier (disk blocks are staged there)
    disk_num_blocks: int = 0
    spill_format: str = "none"  # none | fp8 | int8 | int4: how host memory and disk store blocks
    eviction: str = "lru"  # lru | fifo, in host memory and on disk
    prefetch_depth: int = 4  # waiting requests whose blocks are read ahead from disk
    io_threads: int = 4  # disk I/O threads
    device_format: str = "auto"  # auto (the model dtype) | fp8 | int8 | int4: how the device tier stores full blocks
    fp_window: int = 0  # quantized device tier: recent tokens kept in full precision besides the partial block
    stream_memory_mib: int = 0  # stream store (host memory, spill_format): long sequences' middles, attended from there
    stream_num_blocks: int = 0
    stream_sink_tokens: int = 16  # a streaming sequence's first tokens stay on the device
    stream_window: int = 4096  # and its last cached tokens; the full blocks between them stream
    stream_ahead: int = 2  # layers copied to the device ahead of the one attended (1 .. 4)
    stream_disk_mib: int = 0  # stream blocks past the store: block files read back layer by layer every step
    stream_disk_num_blocks: int = 0
    stream_disk_path: str = ""  # directory that holds them (a private subdirectory per engine; ~ expanded)
    pruning: KVPruning = field(default_factory=KVPruning)  # [kv.pruning]: the default of every request

    @property
    def has_host_tier(self) -> bool:
        return self.host_memory_mib > 0 or self.host_num_blocks > 0

    @property
    def has_stream(self) -> bool:
        return self.stream_memory_mib > 0 or self.stream_num_blocks > 0

    @property
    def has_disk_tier(self) -> bool:
        return self.disk_capacity_mib > 0 or self.disk_num_blocks > 0

    def validate(self, need) -> None:
        need(self.block_size > 0, "kv.block_size", f"block_size must be positive, got {self.block_size}")
        need(self.num_blocks >= 0, "kv.num_blocks", f"num_blocks must be >= 0, got {self.num_blocks}")
        need(self.device_memory_mib > 0, "kv.device_memory_mib", "device_memory_mib must be positive")
        for key in ("host_memory_mib", "host_num_blocks", "disk_capacity_mib", "disk_num_blocks", "prefetch_depth"):
            need(getattr(self, key) >= 0, f"kv.{key}", f"{key} must be >= 0, got {getattr(self, key)}")
        need(self.io_threads > 0, "kv.io_threads", f"io_threads must be positive, got {self.io_threads}")
        need(self.spill_format in FORMAT_NAMES, "kv.spill_format",
             f"spill_format must be one of {', '.join(FORMAT_NAMES)}, got {self.spill_format!r}")
        need(self.eviction in EVICTION_POLICIES, "kv.eviction",
             f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        need(self.device_format in DEVICE_FORMAT_NAMES, "kv.device_format",
             f"device_format must be one of {', '.join(DEVICE_FORMAT_NAMES)}, got {self.device_format!r}")
        need(self.fp_window >= 0, "kv.fp_window", f"fp_window must be >= 0, got {self.fp_window}")
        if self.device_format != "auto":
            need(self.pruning.policy != "h2o", "kv.device_format",
                 "H2O pruning rewrites cached slots in place: use device_format = \"auto\" with [kv.pruning] h2o")
        need(self.has_host_tier or not self.has_disk_tier, "kv.host_memory_mib",
             "a disk tier needs a host tier: disk blocks are staged in host memory")
        need(bool(self.disk_path) or not self.has_disk_tier, "kv.disk_path", "a disk tier needs disk_path")
        need(self.has_disk_tier or not self.disk_path, "kv.disk_capacity_mib",
             "disk_path is set but the disk tier has no size (disk_capacity_mib or disk_num_blocks)")
        self.pruning.validate(lambda ok, key, msg: need(ok, f"kv.pruning.{key}", msg))
        for key in ("stream_memory_mib", "stream_num_blocks", "stream_sink_tokens", "stream_disk_mib",
                    "stream_disk_num_blocks"):
            need(getattr(self, key) >= 0, f"kv.{key}", f"{key} must be >= 0, got {getattr(self, key)}")
        need(self.stream_window >= 1, "kv.stream_window", f"stream_window must be >= 1, got {self.stream_window}")
        need(1 <= self.stream_ahead <= 4, "kv.stream_ahead", f"stream_ahead must be 1 .. 4, got {self.stream_ahead}")
        has_stream_disk = self.stream_disk_mib > 0 or self.stream_disk_num_blocks > 0
        need(self.has_stream or not has_stream_disk, "kv.stream_memory_mib",
             "stream_disk_mib holds stream blocks past the stream store: set stream_memory_mib too")
        need(bool(self.stream_disk_path) or not has_stream_disk, "kv.stream_disk_path",
             "stream_disk_mib needs stream_disk_path")
        need(has_stream_disk or not self.stream_disk_path, "kv.stream_disk_mib",
             "stream_disk_path is set but has no size (stream_disk_mib or stream_disk_num_blocks)")
        if self.has_stream:
            need(self.device_format == "auto", "kv.device_format",
                 "streaming (stream_memory_mib) reads device blocks in the model dtype: use device_format = \"auto\"")
            need(not self.pruning.enabled, "kv.pruning.policy",
                 "streaming (stream_memory_mib) keeps every token: use [kv.pruning] policy = \"none\"")
            need(self.spill_format == "none" or self.block_size & (self.block_size - 1) == 0, "kv.block_size",
                 f"streamed {self.spill_format} blocks are read by the quantized decode kernel, which takes "
                 f"power-of-two block sizes: got block_size {self.block_size}")

    def device_tier(self, layout: Layout, max_num_seqs: int, max_num_batched_tokens: int,
                    source: str | None = None) -> tuple[int, DeviceQuant | None]:
        """-> (device blocks, DeviceQuant or None for blocks in the model dtype). A quantized
        device tier spends device_memory_mib on its staging blocks (full precision, sized for
        max_num_seqs sequences and a step of max_num_batched_tokens: afkv.kv.device) and on
        quantized blocks, so it holds about block_nbytes / quantized nbytes times more blocks
        once the staging blocks are paid for. ConfigError naming file and key when it does not fit."""
        budget = self.device_memory_mib * 2**20
        if self.device_format == "auto":
            return self.num_blocks or max(1, budget // layout.block_nbytes), None
        fmt = self._format(self.device_format, layout, source, "kv.device_format")
        num_staging = staging_blocks_needed(layout.block_size, self.fp_window, max_num_seqs, max_num_batched_tokens)
        quant = DeviceQuant(fmt, self.fp_window, num_staging)
        if self.num_blocks:
            return self.num_blocks, quant
        staging_nbytes = num_staging * layout.block_nbytes
        num_blocks = (budget - staging_nbytes) // fmt.nbytes
        if num_blocks <= 0:
            raise ConfigError(f"device_memory_mib {self.device_memory_mib} does not hold the {num_staging} full-precision "
                              f"staging blocks of a {fmt.name} device tier ({staging_nbytes / 2**20:.1f} MiB for "
                              f"max_num_seqs {max_num_seqs}, max_num_batched_tokens {max_num_batched_tokens}, "
                              f"fp_window {self.fp_window}) plus one block", file=source, key="kv.device_memory_mib")
        return num_blocks, quant

    def stream_config(self, layout: Layout, source: str | None = None) -> StreamConfig | None:
        """The stream store for blocks of `layout` (in spill_format), or None (streaming off).
        ConfigError naming file and key when it holds no block."""
        if not self.has_stream:
            return None
        fmt = self._format(self.spill_format, layout, source, "kv.spill_format")
        num_blocks = self.stream_num_blocks or self.stream_memory_mib * 2**20 // fmt.nbytes
        if num_blocks == 0:
            raise ConfigError(f"the stream store ({self.stream_memory_mib} MiB) is smaller than one block "
                              f"({fmt.nbytes} bytes as {fmt.name})", file=source, key="kv.stream_memory_mib")
        disk_blocks = self.stream_disk_num_blocks or self.stream_disk_mib * 2**20 // fmt.nbytes
        if self.stream_disk_mib and not disk_blocks:
            raise ConfigError(f"stream_disk_mib ({self.stream_disk_mib} MiB) is smaller than one block "
                              f"({fmt.nbytes} bytes as {fmt.name})", file=source, key="kv.stream_disk_mib")
        disk_path = Path(self.stream_disk_path).expanduser() if disk_blocks else None
        return StreamConfig(fmt, num_blocks, self.stream_sink_tokens, self.stream_window, self.stream_ahead,
                            disk_blocks, disk_path)

    @staticmethod
    def _format(name: str, layout: Layout, source: str | None, key: str):
        """The block format `name` for the model's geometry; ConfigError naming file and key when
        the model cannot use it."""
        try:
            return make_format(name, layout)
        except ConfigError as e:
            raise ConfigError(f"{key} = {name!r} does not fit the model: {e}", file=source, key=key) from e

    def tier_config(self, layout: Layout, source: str | None = None) -> TierConfig | None:
        """The tiers below the device for blocks of `layout`, or None (device only).
        ConfigError naming file and key when a size or quantization does not fit the model."""
        if not self.has_host_tier:
            return None
        fmt = self._format(self.spill_format, layout, source, "kv.spill_format")
        host_num_blocks = self.host_num_blocks or self.host_memory_mib * 2**20 // fmt.nbytes
        if host_num_blocks == 0:
            raise ConfigError(f"the host tier ({self.host_memory_mib} MiB) is smaller than one block "
                              f"({fmt.nbytes} bytes as {fmt.name})", file=source, key="kv.host_memory_mib")
        if not self.has_disk_tier:
            return TierConfig(fmt, host_num_blocks, eviction=self.eviction, io_threads=self.io_threads)
        disk_key = "disk_num_blocks" if self.disk_num_blocks else "disk_capacity_mib"
        disk_num_blocks = self.disk_num_blocks or self.disk_capacity_mib * 2**20 // (HEADER_NBYTES + fmt.nbytes)
        if disk_num_blocks == 0:
            raise ConfigError(f"the disk tier ({self.disk_capacity_mib} MiB) is smaller than one block "
                              f"({HEADER_NBYTES + fmt.nbytes} bytes as {fmt.name})", file=source,
                              key="kv.disk_capacity_mib")
        return TierConfig(fmt, host_num_blocks, disk_num_blocks, Path(self.disk_path).expanduser(), self.eviction,
                          self.prefetch_depth, self.io_threads, disk_capacity_key=disk_key)

    def check_memory(self, layout: Layout, num_device_blocks: int, quant: DeviceQuant | None,
                     tiers: TierConfig | None, device_type: str, source: str | None = None,
                     available: dict[str, int] | None = None, stream: StreamConfig | None = None) -> None:
        """Before allocating: the device tier (and the stream's staging ring) must fit the
        device's free memory, the host tier and the stream store the host's available memory
        (on a CPU device both share it). ConfigError naming the key and what fits. `available`
        (bytes, "device"/"host") defaults to this machine's now."""
        available = available or available_memory(device_type)
        device_nbytes = num_device_blocks * (layout.block_nbytes if quant is None else quant.format.nbytes)
        if quant is not None:
            device_nbytes += quant.num_staging_blocks * layout.block_nbytes
        if stream is not None:
            device_nbytes += (stream.ahead + 1) * stream.num_blocks * stream.format.layer_nbytes
        where = "GPU memory" if device_type == "cuda" else "memory"
        device_key = "kv.num_blocks" if self.num_blocks else "kv.device_memory_mib"
        _need_fits(device_nbytes, available["device"], f"the device KV tier ({num_device_blocks} blocks)",
                   f"this machine has {_gib(available['device'])} of {where} available", device_key, source)
        host_available = available["host"] - (device_nbytes if device_type == "cpu" else 0)
        if stream is not None:
            stream_key = "kv.stream_num_blocks" if self.stream_num_blocks else "kv.stream_memory_mib"
            stream_nbytes = stream.num_blocks * stream.format.nbytes
            _need_fits(stream_nbytes, host_available, f"the stream store ({stream.num_blocks} blocks as {stream.format.name})",
                       f"{_gib(host_available)} of memory is available", stream_key, source)
            host_available -= stream_nbytes
        if tiers is None:
            return
        host_key = "kv.host_num_blocks" if self.host_num_blocks else "kv.host_memory_mib"
        _need_fits(tiers.host_num_blocks * tiers.format.nbytes, host_available,
                   f"the host KV tier ({tiers.host_num_blocks} blocks as {tiers.format.name})",
                   f"{_gib(host_available)} of memory is available" + (" beside the device tier"
                                                                       if device_type == "cpu" else ""),
                   host_key, source)


MEMORY_HEADROOM = 0.9  # KV tiers may take this share of the memory available when the engine starts


def available_memory(device_type: str) -> dict[str, int]:
    """Bytes available now: "host" (MemAvailable on Linux) and "device" (free GPU memory, or host)."""
    host = _host_available()
    if device_type != "cuda":
        return {"host": host, "device": host}
    import torch

    return {"host": host, "device": torch.cuda.mem_get_info()[0]}


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _need_fits(nbytes: int, available: int, what: str, where: str, key: str, source: str | None) -> None:
    fits = max(0, int(available * MEMORY_HEADROOM))
    if nbytes > fits:
        raise ConfigError(f"{what} needs {_gib(nbytes)} but {where}: at most {fits // 2**20} MiB fits "
                          f"({MEMORY_HEADROOM:.0%} of it); make {key.removeprefix('kv.')} smaller, or see the "
                          "README's storage-tier configs for how to scale them", file=source, key=key)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step; longer prompts are prefilled in chunks
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    max_prompt_chars: int = 0  # longer text is refused before tokenizing; 0: 2 x max_model_len x longest token


EXPERT_BATCHING = ("per_attention_node", "merged")  # [deployment] expert_batching


@dataclass(frozen=True)
class DeploymentConfig:
    """Attention-FFN disaggregation: M attention nodes x N expert nodes (see afkv.nodes), and
    prefill/decode disaggregation: P prefill nodes hand prompts' KV blocks to the attention
    nodes, which then decode (afkv.nodes.handoff). Ranks: attention 0..M-1, expert M..M+N-1,
    prefill M+N..M+N+P-1. expert_nodes = 0: the attention nodes run the experts (colocated
    replicas; with prefill nodes, colocated decode nodes)."""

    attention_nodes: int = 1
    expert_nodes: int = 1
    prefill_nodes: int = 0  # colocated engines that run chunked prefill only and hand the KV over
    micro_batches: int = 0  # 0: the fastest of 1, 2 and MegaScale-Infer's rule, measured per batch bucket
    host: str = "127.0.0.1"  # nodes bind here; the rendezvous store listens here
    port: int = 29600  # rendezvous (afkv.nodes.rendezvous); 0: any free port (afkv launch)
    token: str = ""  # shared secret every peer proves it holds; node processes fall back to $AFKV_TOKEN
    attention_devices: tuple[str, ...] = ()  # per attention node: "cpu", "cuda:0", ...; empty: auto
    expert_devices: tuple[str, ...] = ()  # per expert node
    prefill_devices: tuple[str, ...] = ()  # per prefill node
    expert_timeout_s: float = 10.0  # an expert node silent this long is lost
    prefill_timeout_s: float = 30.0  # a KV hand-off from one prefill node ends within this (else elsewhere)
    handoff_format: str = "none"  # rows on the wire between prefill and decode nodes: none (raw) | fp8 | int8 | int4
    client_timeout_s: float = 60.0  # an API client silent this long (or this slow sending one frame) is dropped
    heartbeat_interval_s: float = 1.0
    dispatch_capacity: float = 0.0  # rows per (micro-batch, expert node) as a share; 0: from the placement
    # how an expert node batches its attention nodes' rows: "per_attention_node" (each step alone) or
    # "merged" (one FFN call per layer and micro-batch over every attention node's rows, read of the
    # expert weights shared; the attention nodes step in lockstep). The default stays per_attention_node
    # until a multi-GPU run has measured merged (afkv.nodes.expert_plane; README "Choosing a deployment").
    expert_batching: str = "per_attention_node"

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_devices", tuple(self.attention_devices))
        object.__setattr__(self, "expert_devices", tuple(self.expert_devices))
        object.__setattr__(self, "prefill_devices", tuple(self.prefill_devices))

    @property
    def world_size(self) -> int:
        return self.attention_nodes + self.expert_nodes + self.prefill_nodes

    def role(self, rank: int) -> tuple[str, int]:
        """rank -> (role, index within the role): "attention", "expert" or "prefill"."""
        if rank < self.attention_nodes:
            return "attention", rank
        if rank < self.attention_nodes + self.expert_nodes:
            return "expert", rank - self.attention_nodes
        return "prefill", rank - self.attention_nodes - self.expert_nodes


@dataclass(frozen=True)
class EplbConfig:
    """Expert load balancing (afkv.eplb, afkv.nodes.balancer): redundant expert slots on the expert
    nodes, load statistics, rebalancing while serving."""

    enabled: bool = False
    slots_per_node: int = 0  # expert slots per node and MoE layer; 0: ceil(experts / expert_nodes), no replicas
    window_s: float = 60.0  # load statistics: tokens per (layer, expert) over this sliding window
    rebalance_interval_s: float = 0.0  # attention node 0 rebalances this often; 0: only when asked


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    upcycle: UpcycleSpec | None = None  # None: the default model gets UpcycleSpec(); others stay dense
    kv: KVConfig = field(default_factory=KVConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    source: str | None = field(default=None, compare=False)  # the TOML file, for errors found after loading
    deployment: DeploymentConfig | None = None  # None: colocated (both halves in this process)
    eplb: EplbConfig = field(default_factory=EplbConfig)

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
        sections = {"model": ModelConfig, "upcycle": UpcycleSpec, "kv": KVConfig, "scheduler": SchedulerConfig,
                    "deployment": DeploymentConfig, "eplb": EplbConfig}
        kwargs = {}
        for name, value in data.items():
            if name not in sections:
                raise ConfigError(f"unknown section [{name}]; known: {', '.join(sections)}", file=source, key=name)
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table", file=source, key=name)
            if name == "kv" and "pruning" in value:
                pruning = value["pruning"]
                if not isinstance(pruning, dict):
                    raise ConfigError("[kv.pruning] must be a table", file=source, key="kv.pruning")
                value = value | {"pruning": _build(KVPruning, pruning, "kv.pruning", source)}
            kwargs[name] = _build(sections[name], value, name, source)
        cfg = cls(**kwargs, source=source)
        cfg.validate(source)
        return cfg

    def validate(self, source: str | None = None) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, file=source, key=key)

        need(self.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
             f"dtype must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        need(self.model.cpu_threads >= 0, "model.cpu_threads",
             f"cpu_threads must be 0 (auto: OMP_NUM_THREADS, else the cores less one) or a thread count, "
             f"got {self.model.cpu_threads}")
        need(self.model.expert_dtype in EXPERT_DTYPES, "model.expert_dtype",
             f"expert_dtype must be one of {', '.join(EXPERT_DTYPES)}, got {self.model.expert_dtype!r}")
        need(self.model.device == "auto" or self.model.device == "cpu" or self.model.device.startswith("cuda"),
             "model.device", f"device must be auto, cpu or cuda[:N], got {self.model.device!r}")
        self.kv.validate(need)
        need(self.scheduler.max_num_seqs > 0, "scheduler.max_num_seqs", "max_num_seqs must be positive")
        need(self.scheduler.max_num_batched_tokens > 0, "scheduler.max_num_batched_tokens",
             "max_num_batched_tokens must be positive")
        need(self.scheduler.max_model_len >= 0, "scheduler.max_model_len", "max_model_len must be >= 0")
        need(self.scheduler.max_prompt_chars >= 0, "scheduler.max_prompt_chars", "max_prompt_chars must be >= 0")
        d = self.deployment
        if d is not None:
            need(d.attention_nodes >= 1, "deployment.attention_nodes", "attention_nodes must be >= 1")
            need(d.prefill_nodes >= 0, "deployment.prefill_nodes", "prefill_nodes must be >= 0")
            need(d.expert_nodes >= 0, "deployment.expert_nodes", "expert_nodes must be >= 0 (0: the attention "
                 "nodes run the experts themselves)")
            need(d.prefill_timeout_s > 0, "deployment.prefill_timeout_s", "prefill_timeout_s must be positive")
            need(d.handoff_format in FORMAT_NAMES, "deployment.handoff_format",
                 f"handoff_format must be one of {', '.join(FORMAT_NAMES)}, got {d.handoff_format!r}")
            need(0 <= d.micro_batches <= 16, "deployment.micro_batches", "micro_batches must be in [0, 16]")
            need(0 <= d.port < 65536, "deployment.port", f"port must be in [0, 65535], got {d.port}")
            need(d.expert_timeout_s > 0, "deployment.expert_timeout_s", "expert_timeout_s must be positive")
            need(d.client_timeout_s > 0, "deployment.client_timeout_s", "client_timeout_s must be positive")
            need(d.heartbeat_interval_s > 0, "deployment.heartbeat_interval_s", "heartbeat_interval_s must be positive")
            need(0 <= d.dispatch_capacity <= 1, "deployment.dispatch_capacity",
                 f"dispatch_capacity must be in [0, 1] (0: from the placement), got {d.dispatch_capacity}")
            need(d.expert_batching in EXPERT_BATCHING, "deployment.expert_batching",
                 f"expert_batching must be one of {', '.join(EXPERT_BATCHING)}, got {d.expert_batching!r}")
            need(d.host in ("127.0.0.1", "localhost", "::1") or bool(d.token), "deployment.token",
                 f"binding to {d.host!r} (not loopback) requires a shared token")
            for key, devs, n in (("attention_devices", d.attention_devices, d.attention_nodes),
                                 ("expert_devices", d.expert_devices, d.expert_nodes),
                                 ("prefill_devices", d.prefill_devices, d.prefill_nodes)):
                need(not devs or len(devs) == n, f"deployment.{key}", f"{key} must list {n} devices, got {len(devs)}")
        e = self.eplb
        need(e.slots_per_node >= 0, "eplb.slots_per_node", f"slots_per_node must be >= 0, got {e.slots_per_node}")
        need(e.window_s > 0, "eplb.window_s", f"window_s must be positive, got {e.window_s}")
        need(e.rebalance_interval_s >= 0, "eplb.rebalance_interval_s",
             f"rebalance_interval_s must be >= 0, got {e.rebalance_interval_s}")
        need(not e.enabled or (d is not None and d.expert_nodes > 0), "eplb.enabled",
             "EPLB balances expert nodes: it needs a [deployment] with expert_nodes")


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
