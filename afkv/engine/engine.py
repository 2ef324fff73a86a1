"""Engine: the async API of afkv (colocated mode: both halves of the model in this process).

    async with afkv.Engine(model=path_or_None, config=cfg_or_toml) as engine:
        async for chunk in engine.generate(prompt, SamplingParams(...)): ...
        completion = await engine.complete(prompt, params)

Concurrency: one asyncio event loop (the caller's) runs the step loop, request
admission, detokenization and stop checks; one worker thread ("afkv-model") does all
torch work (loading, forward passes, sampling); one more ("afkv-tokenize") renders and
tokenizes prompts, after a size check on the loop (text above `max_prompt_chars` is
refused before tokenizing). The scheduler, sequences and KV block tables are touched only
on the loop thread, between steps; the worker only sees an immutable plan of the current
step. The scheduler owns the sequences: the engine reads them, and asks it to commit a
step (`postprocess`) and to end a request (`finish`, `abort`, `fail`).

Disaggregated (`config.deployment`): the FFN backend is afkv.nodes.remote_ffn.RemoteFFN,
whose ExpertLinks (`_links`) also serve the EPLB balancer (colocated FFN when the deployment
has no expert nodes). Clients of a running deployment attach through afkv.attach (the serve
layer).

Prefill/decode disaggregation (`[deployment] prefill_nodes`, afkv.nodes.handoff): this engine
is a decode node. A prompt with full blocks it lacks is handed off before it is scheduled: the
blocks are fetched from a prefill node (PrefillLinks, `_prefill`) into the sequence's table,
then the scheduler admits it like a sequence with a cached prefix. `_Request.handoff` is that
task; an abort cancels it and frees the blocks. A prefill node's engine answers
`export_prefill` (the serve layer's PrefillServer calls it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from afkv.config import EngineConfig, default_cpu_threads
from afkv.engine.micro_batches import MicroBatchTuner
from afkv.engine.params import Completion, CompletionChunk, SamplingParams
from afkv.engine.runner import ChunkResult, ModelRunner
from afkv.engine.scheduler import Scheduler, SchedulerLimits
from afkv.engine.sequence import Sequence, SeqStatus
from afkv.errors import (
    AfkvError,
    ConfigError,
    EmptyPromptError,
    EngineClosedError,
    EngineError,
    EngineFailedError,
    ExpertRowsUnavailableError,
    ExpertUnavailableError,
    InvalidSamplingParamsError,
    PeerLostError,
    PromptTooLongError,
    RequestError,
    RequestFailedError,
    StepRetryError,
)
from afkv.kv.formats import BlockFormat, RawFormat, make_format
from afkv.kv.layout import Layout, layout_for
from afkv.kv.manager import KVManager
from afkv.kv.metrics import KVMetricsSnapshot
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import Model, load_attention_side, load_colocated
from afkv.model.spec import ModelSpec, UpcycleSpec
from afkv.model.tokenizer import Tokenizer

log = logging.getLogger("afkv.engine")

Prompt = str | list[dict] | Seq[int]


class EngineState(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"  # the step loop stopped on an unexpected error: no new requests; close it
    CLOSED = "closed"


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_steps: int
    num_preemptions: int
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_generated_tokens: int
    num_step_retries: int = 0  # steps computed again (the fixed-buffer data plane ran out of room, or lost a node)
    num_handoffs: int = 0  # requests whose prompt KV a prefill node is handing over (PD decode node)


def resolve_device(name: str) -> torch.device:
    """auto -> the current CUDA device if there is one, else the CPU; "cuda" gets its index."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_model(model: str | Path | None, cfg: EngineConfig, progress: bool = True) -> tuple[Path, UpcycleSpec | None]:
    """-> (checkpoint directory, upcycling): None is the embedded default model, upcycled."""
    if model is None:
        from afkv.model.default import ensure_default_checkpoint

        return ensure_default_checkpoint(progress=progress), cfg.upcycle or UpcycleSpec()
    return Path(model), cfg.upcycle


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


_MLA_H2O = ("H2O pruning is not available for MLA models (DeepSeek): it compacts keys and values per token "
            "and scores them on the GQA attention path, and an MLA cache holds latents; use policy \"streaming\"")


def check_prompt_size(prompt: object, max_prompt_chars: int, max_model_len: int, bound: str = "") -> None:
    """PromptTooLongError for a prompt that cannot fit, before any tokenizing: text of more
    than max_prompt_chars characters (chat: in the messages' contents), or a list of
    max_model_len or more token ids or messages (`bound`: what sets max_model_len, for the
    message). O(1) per message: safe on the event loop."""
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        chars = sum(len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str) else 0
                    for m in prompt[:max_model_len])
    else:
        chars = 0
    if chars > max_prompt_chars:
        raise PromptTooLongError(f"the prompt has {chars} characters; this engine refuses more than "
                                 f"{max_prompt_chars} (scheduler.max_prompt_chars) before tokenizing")
    if isinstance(prompt, (list, tuple)) and len(prompt) >= max_model_len:
        raise PromptTooLongError(f"the prompt has {len(prompt)} token ids or messages; this engine's context is "
                                 f"{max_model_len} tokens" + (f", bounded by {bound}" if bound else ""))


class _Request:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None):
        self.seq = seq
        self.queue: asyncio.Queue[CompletionChunk | BaseException] = asyncio.Queue()
        self.text_stream = tokenizer.stream() if tokenizer is not None else None
        self.held_text = ""  # decoded, not yet emitted: it could be the start of a stop string
        self.sent_first_chunk = False
        self.handoff: asyncio.Task | None = None  # decode node: its KV coming from a prefill node
        self.export: _Export | None = None  # prefill node: the blocks to hand over


class _Export:
    """A prefill request's hand-over: the blocks asked for ({table index: hash}) not yet read,
    in the rows of `format`, read into `into`'s rows (the k-th block asked for into row
    slots[k]) or, with no `into`, into fresh host buffers. Read futures go to the request's
    queue in table order; `issued` keeps them all (the export ends once they are done)."""

    def __init__(self, want: dict[int, bytes], fmt: BlockFormat, into: torch.Tensor | None, slots: list[int]):
        self.want, self.format, self.into = dict(want), fmt, into
        self.slot_of = dict(zip(sorted(want), slots))
        self.issued: list[Future] = []


async def _settled(futures: list[Future]) -> None:
    """Wait until every future is done (whatever its outcome: its reader reports failures)."""
    pending = [asyncio.wrap_future(f) for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending)


@dataclass(frozen=True)
class ExportedBlocks:
    """Rows of full KV blocks a prefill request hands over: table entries `indices` with their
    chained hashes, rows uint8 [n, format.nbytes]: in host memory, or the slots of the
    export's `into` they were written to (host or device memory)."""

    indices: list[int]
    hashes: list[bytes]
    rows: torch.Tensor


class Engine:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | str | Path | None = None, *,
                 progress: bool = True, attention_rank: int = 0):
        """`config.deployment` set: this engine is attention node `attention_rank` of that
        deployment and sends FFN work to its expert nodes; otherwise it is colocated."""
        if isinstance(config, (str, Path)):
            config = EngineConfig.from_toml(config)
        self.config = config or EngineConfig()
        self._model_path = str(model) if model else (self.config.model.path or None)
        self._progress = progress
        self.attention_rank = attention_rank
        self._remote = None  # afkv.nodes.remote_ffn.RemoteFFN when disaggregated
        self._links = None  # its afkv.nodes.links.ExpertLinks
        self._prefill = None  # afkv.nodes.handoff.PrefillLinks when the deployment has prefill nodes
        self._balancer = None  # afkv.nodes.balancer.Balancer when [eplb] is enabled
        self._kv: KVManager | None = None
        self._state = EngineState.NEW
        self._requests: dict[int, _Request] = {}
        self._aborts: set[int] = set()
        self._next_id = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._failure: str | None = None  # why the step loop stopped (state FAILED)
        self._executor: ThreadPoolExecutor | None = None
        self._tokenize_executor: ThreadPoolExecutor | None = None
        self._num_steps = 0
        self._num_retries = 0  # steps computed again (StepRetryError)
        d = self.config.deployment
        # [deployment] micro_batches = 0: m of each step from measured step times
        self._tuner = MicroBatchTuner() if d and d.expert_nodes and not d.micro_batches else None
        self.spec: ModelSpec | None = None
        self.tokenizer: Tokenizer | None = None
        self.model_dir: Path | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._state is not EngineState.NEW:
            raise EngineClosedError(f"an Engine starts once; this one is {self._state.value}")
        self._state = EngineState.STARTING
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="afkv-model")
        self._tokenize_executor = ThreadPoolExecutor(1, thread_name_prefix="afkv-tokenize")
        try:
            await loop.run_in_executor(self._executor, self._load)
            d = self.config.deployment
            if d is not None and d.prefill_nodes:
                from afkv.nodes.handoff import PrefillLinks

                self._prefill = PrefillLinks(d, f"decode{self.attention_rank}", self._kv.metrics.counters)
            if d is not None and d.expert_nodes:
                from afkv.nodes.attention import connect_expert_nodes

                self._remote = await connect_expert_nodes(self.spec, self.config.deployment, self.attention_rank,
                                                          self._device, self._dtype, self._executor, self.config.eplb)
                self._links = self._remote.links
                self._model.ffn = self._remote
                if self._runner.graphs is None:  # the NCCL data plane can be captured too
                    self._runner.graphs = await loop.run_in_executor(self._executor, self._decode_graphs, self._model,
                                                                     self._layout, self._runner.kv)
                if self.config.eplb.enabled:
                    from afkv.nodes.balancer import Balancer

                    self._balancer = Balancer(self._links, self.spec, self.config.eplb)
                    if self.attention_rank == 0:  # the coordinator: the only node that changes the placement
                        self._balancer.start_periodic()
        except BaseException:
            if self._remote is not None:
                await self._remote.aclose()
            if self._kv is not None:
                await self._kv.aclose()  # releases a disk tier taken during _load
            self._executor.shutdown(wait=False)
            self._tokenize_executor.shutdown(wait=False)
            self._state = EngineState.CLOSED
            raise
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(), name="afkv-step-loop")
        self._task.add_done_callback(self._on_step_loop_done)
        self._state = EngineState.RUNNING

    def _on_step_loop_done(self, task: asyncio.Task) -> None:
        """The step loop ends only when cancelled by aclose; any other end is a bug in the step
        path (the scheduler or the KV manager raised). Its requests would wait forever: end each
        with EngineFailedError and refuse new ones, so callers and /health see it at once."""
        if task.cancelled() or self._state is EngineState.CLOSED:
            return
        exc = task.exception()
        log.error("the step loop stopped: %s; failing %d requests", exc, len(self._requests),
                  exc_info=(type(exc), exc, exc.__traceback__))
        self._state = EngineState.FAILED
        self._failure = f"{type(exc).__name__}: {exc}"
        for req in self._requests.values():
            if req.handoff is not None:
                req.handoff.cancel()  # frees its blocks; its sequence never reaches the scheduler
            req.queue.put_nowait(EngineFailedError(f"the engine's step loop stopped ({self._failure}); "
                                                   "close this engine and start a new one"))
        self._requests.clear()

    async def aclose(self) -> None:
        if self._state is EngineState.CLOSED:
            return
        self._state = EngineState.CLOSED
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
            except Exception:  # the step loop had failed: reported by _on_step_loop_done
                pass
        handoffs = [r.handoff for r in self._requests.values() if r.handoff is not None]
        for task in handoffs:
            task.cancel()
        await asyncio.gather(*handoffs, return_exceptions=True)
        for req in self._requests.values():
            req.queue.put_nowait(EngineClosedError("the engine was closed before the request finished"))
        self._requests.clear()
        if self._prefill is not None:
            await self._prefill.aclose()
        if self._balancer is not None:
            await self._balancer.aclose()
        if self._remote is not None:
            await self._remote.aclose()  # unblocks a step waiting on an expert node
        try:
            if self._kv is not None:
                await self._kv.aclose()  # saves the disk tier's index (TierError if it cannot), releases its directory
        finally:
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, True)
            if self._tokenize_executor is not None:
                self._tokenize_executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        """Worker thread: checkpoint, tokenizer, KV cache, runner."""
        cfg = self.config
        device = resolve_device(cfg.model.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this worker thread does all of this engine's GPU work
        else:
            torch.set_num_threads(cfg.model.cpu_threads or default_cpu_threads())
        self._device, self._dtype = device, dtype
        self.model_dir, upcycle = resolve_model(self._model_path, cfg, self._progress)
        if cfg.deployment is None or not cfg.deployment.expert_nodes:
            model = load_colocated(self.model_dir, device, dtype, upcycle, cfg.model.expert_dtype)
        else:
            spec, attn = load_attention_side(self.model_dir, device, dtype, upcycle)
            model = Model(spec, attn, ffn=None)  # the RemoteFFN is attached once connected
        self._model = model
        self.spec = spec = model.spec
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        if spec.is_mla and cfg.kv.pruning.needs_scores:
            raise ConfigError(_MLA_H2O, file=cfg.source, key="kv.pruning.policy")
        self._layout = layout = layout_for(spec, cfg.kv.block_size, dtype)
        num_blocks, quant = cfg.kv.device_tier(layout, cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens,
                                               cfg.source)
        tiers = cfg.kv.tier_config(layout, cfg.source)
        stream = cfg.kv.stream_config(layout, cfg.source)
        if stream is not None and spec.is_mla:
            raise ConfigError("streaming (stream_memory_mib) feeds K/V blocks to the GQA attention path; MLA latents "
                              "(DeepSeek) are not streamed", file=cfg.source, key="kv.stream_memory_mib")
        if stream is not None and spec.sliding_window is not None:
            raise ConfigError(f"streaming (stream_memory_mib) attends every token; this model uses a sliding window of "
                              f"{spec.sliding_window}", file=cfg.source, key="kv.stream_memory_mib")
        cfg.kv.check_memory(layout, num_blocks, quant, tiers, device.type, cfg.source, stream=stream)  # before allocating
        experts = () if cfg.model.expert_dtype == "auto" else (cfg.model.expert_dtype,)  # other weights: other KV
        salt = repr((str(self.model_dir.resolve()), spec.upcycle, str(dtype), *experts)).encode()
        self._kv = KVManager(layout, num_blocks, device, salt=salt[-64:], tiers=tiers,
                             worker=self._executor, wakeup=lambda: self._wakeup.set(), quant=quant, stream=stream)
        m = 1 if cfg.deployment is None or not cfg.deployment.expert_nodes else (cfg.deployment.micro_batches or 1)
        eos = set(spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self._scheduler = Scheduler(self._kv, SchedulerLimits(cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens),
                                    cfg.kv.pruning, frozenset(eos))
        self.max_model_len = min(cfg.scheduler.max_model_len or spec.max_position, spec.max_position, self._kv.capacity_tokens)
        if self.max_model_len == self._kv.capacity_tokens:
            self._context_bound = ("the device tier plus the stream store and its disk ([kv] num_blocks / "
                                   "device_memory_mib + stream_memory_mib / stream_num_blocks + stream_disk_mib / "
                                   "stream_disk_num_blocks)" if stream is not None else
                                   "the device tier ([kv] num_blocks / device_memory_mib; [kv] stream_memory_mib "
                                   "streams longer contexts from host memory)")
        else:
            self._context_bound = "[scheduler] max_model_len or the model's max_position_embeddings"
        longest = self.tokenizer.max_token_chars if self.tokenizer is not None else 1
        self.max_prompt_chars = cfg.scheduler.max_prompt_chars or 2 * self.max_model_len * longest
        cache = self._kv.attention_cache
        self._runner = ModelRunner(model, cache, layout.block_size, device, micro_batches=m,
                                   graphs=self._decode_graphs(model, layout, cache), key_mass=self._kv.key_mass,
                                   stream=self._kv.stream_ring)

    def _decode_graphs(self, model: Model, layout: Layout, cache) -> DecodeGraphs | None:
        """CUDA graphs for decode steps when this engine can replay them: a CUDA device, an FFN
        backend whose step is GPU work only (local, or NCCL) and the Triton decode kernels
        (`cache`: the device cache or a quantized device tier, as the runner reads it)."""
        if not (self.config.model.cuda_graphs and self._device.type == "cuda" and getattr(model.ffn, "graph_safe", False)):
            return None
        from afkv.ops import triton_attention  # imports triton: only on GPU machines

        if not triton_attention.available():
            log.info("CUDA graphs off: triton is not installed (decode attention would read padded tables)")
            return None
        scratch = self._kv.reserve_scratch_block()  # padding rows of a captured batch write here
        if scratch is None:
            return None
        max_blocks = min(layout.num_blocks_for(self.max_model_len), self._kv.pool.num_blocks)  # streamed rows run eagerly
        return DecodeGraphs(model, cache, self.config.scheduler.max_num_seqs, max_blocks, scratch)

    @property
    def state(self) -> EngineState:
        return self._state

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._scheduler.running),
            num_waiting=len(self._scheduler.waiting),
            num_free_blocks=self._kv.pool.num_free_blocks,
            num_blocks=self._kv.pool.num_blocks,
            num_steps=self._num_steps,
            num_preemptions=self._scheduler.num_preemptions,
            num_prompt_tokens=self._scheduler.num_prompt_tokens,
            num_cached_prompt_tokens=self._scheduler.num_cached_prompt_tokens,
            num_generated_tokens=self._scheduler.num_generated_tokens,
            num_step_retries=self._num_retries,
            num_handoffs=sum(r.handoff is not None for r in self._requests.values()),
        )

    @property
    def kv_manager(self) -> KVManager:
        return self._kv

    @property
    def free_kv_tokens(self) -> int:
        """Device KV tokens not yet promised (what a router compares between decode nodes): the
        pool's free blocks (cached ones included: they are evicted on demand) less the prompts
        waiting for admission. Negative when the waiting prompts need more than is free."""
        waiting = sum(len(seq.token_ids) for seq in self._scheduler.waiting)
        return self._kv.pool.num_free_blocks * self._layout.block_size - waiting

    def kv_metrics(self) -> KVMetricsSnapshot:
        """Per-tier occupancy, hits by tier, bytes moved each way, copy/spill/prefetch latency."""
        return self._kv.metrics_snapshot()

    @property
    def micro_batches(self) -> int:
        return self._runner.micro_batches

    def set_micro_batches(self, m: int) -> None:
        """Fix the number of micro-batches per step (takes effect at the next step); 0: choose
        it from measured step times again (afkv.engine.micro_batches; disaggregated only)."""
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= 16:
            raise ValueError(f"micro_batches must be an integer in [0, 16] (0: automatic), got {m!r}")
        if m == 0:
            d = self.config.deployment
            self._tuner = MicroBatchTuner() if d and d.expert_nodes else None
            if self._tuner is None:
                self._runner.micro_batches = 1
            return
        self._runner.micro_batches = m
        self._tuner = None

    def micro_batch_choices(self) -> dict[int, int]:
        """Automatic micro-batches: decode rows bucket (a power of two) -> the m it runs, for the
        buckets measured so far; {} when m is fixed."""
        return {} if self._tuner is None else self._tuner.choices

    def layer_timings(self) -> dict[str, float]:
        """Mean seconds per micro-batch layer: attention, transfer, expert, idle (disaggregated)."""
        t = self._model.timings
        n = max(t.count, 1)
        out = {"attention_s": t.attention_s / n, "idle_s": t.wait_s / n}
        if self._remote is not None:
            r = self._remote.timings
            rn = max(r.count, 1)
            out |= {"transfer_s": r.transfer_s / rn, "expert_s": r.expert_s / rn}
        return out

    # ---- expert load balancing (EPLB) -----------------------------------------------------------
    def _need_balancer(self, coordinator: bool):
        if self._balancer is None:
            raise EngineError("expert load balancing needs a [deployment] with [eplb] enabled = true")
        if coordinator and self.attention_rank != 0:
            raise EngineError(f"only attention node 0 rebalances (this is attention node {self.attention_rank})")
        return self._balancer

    async def expert_loads(self) -> torch.Tensor:
        """Tokens per (layer, logical expert) over the expert nodes' window. -> [L, E] int64"""
        return await self._need_balancer(False).loads()

    @property
    def eplb_enabled(self) -> bool:
        return self._balancer is not None

    async def expert_balancedness(self) -> float:
        """Max / mean tokens per live expert node over the window, summed over MoE layers (1.0 is
        even): the load imbalance EPLB reduces."""
        from afkv.nodes.balancer import node_balancedness

        balancer = self._need_balancer(False)
        per_node = await balancer.node_loads()
        if not per_node:
            raise PeerLostError("no expert node answered for load statistics")
        router = torch.tensor(balancer.links.placement.has_router)  # [L] layers with experts
        return node_balancedness(torch.stack([n.sum(-1) for n in per_node.values()], -1)[router])  # [L_moe, N]

    async def rebalance(self):
        """Place experts (with replicas) for the measured loads and switch to that placement
        between two steps while serving. -> afkv.nodes.balancer.RebalanceReport"""
        return await self._need_balancer(True).rebalance()

    # ---- requests --------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError("the prompt is empty")
            if self.tokenizer is None:
                raise RequestError(f"the model in {self.model_dir} has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise RequestError(f"the model in {self.model_dir} has no tokenizer: chat prompts need one")
            return self.tokenizer.encode(self.tokenizer.render_chat(list(prompt)), add_special_tokens=False)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise EmptyPromptError("the prompt is empty")
            vocab = self.spec.vocab_size
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise RequestError(f"prompt token id {t!r} is not an integer in [0, {vocab})")
            return list(prompt)
        raise RequestError(f"a prompt is a string, a list of chat messages or a list of token ids, not {type(prompt).__name__}")

    def _tokenize_checked(self, prompt: Prompt) -> list[int]:
        """Tokenizer thread: tokenize; any failure is a RequestError naming the cause."""
        try:
            return self.tokenize(prompt)
        except RequestError:
            raise
        except Exception as exc:  # a chat template that raises, a tokenizer that refuses the text
            raise RequestError(f"cannot tokenize the prompt: {type(exc).__name__}: {exc}") from exc

    def _check_running(self) -> None:
        if self._state is EngineState.FAILED:
            raise EngineFailedError(f"the engine's step loop stopped ({self._failure}); close it and start a new one")
        if self._state is not EngineState.RUNNING:
            raise EngineClosedError(f"the engine is {self._state.value}: use `async with Engine(...)` or await start()")

    async def _add(self, prompt: Prompt, params: SamplingParams | None) -> _Request:
        self._check_running()
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, not {type(params).__name__}")
        if self.spec.is_mla and params.pruning is not None and params.pruning.needs_scores:
            raise InvalidSamplingParamsError(f"pruning: {_MLA_H2O}")
        check_prompt_size(prompt, self.max_prompt_chars, self.max_model_len, self._context_bound)
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenize_executor, self._tokenize_checked, prompt)
        self._check_running()  # it may have closed or failed while the prompt was tokenized
        if not ids:
            raise EmptyPromptError("the prompt is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this engine's context is {self.max_model_len} tokens "
                f"(prompt plus at least one new token), bounded by {self._context_bound}"
            )
        seq_id = self._next_id
        self._next_id += 1
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(seq_id, ids, params, seed, self.max_model_len, time.monotonic())
        req = self._requests[seq_id] = _Request(seq, self.tokenizer)
        if self._prefill is not None and not seq.wants_prompt_logprobs:
            req.handoff = asyncio.create_task(self._hand_off(req), name=f"afkv-handoff {seq_id}")
            return req
        self._scheduler.add(seq)
        self._wakeup.set()
        return req

    async def _hand_off(self, req: _Request) -> None:
        """Decode node: fetch the prompt's full blocks this node lacks from a prefill node into
        the sequence's table, then let the scheduler admit it (it computes the last partial
        block and samples). A prompt without such blocks, or that the pool cannot hold now, is
        computed here. On a failure or a cancel every block taken is freed."""
        seq = req.seq
        kv = self._kv
        want = kv.begin_handoff(seq.seq_id, seq.token_ids, seq.params.pruning or self._scheduler.pruning)
        try:
            if want:
                fmt = make_format(self.config.deployment.handoff_format, self._layout)
                whole = kv.num_full_blocks(seq.seq_id) * self._layout.block_size
                def acked() -> None:
                    seq.metrics.handoff_ack_s = time.monotonic()

                await self._prefill.fetch(seq.token_ids[:whole], want, fmt, kv.kv.device,
                                          lambda indices, rows, slots: kv.receive(seq.seq_id, indices, rows, fmt,
                                                                                  slots), acked)
            if want is not None:
                kv.end_handoff(seq.seq_id)
                seq.metrics.num_handoff_tokens = len(want) * self._layout.block_size
                seq.metrics.handoff_end_s = time.monotonic()
        except asyncio.CancelledError:
            kv.free(seq.seq_id)
            raise
        except Exception as exc:  # PrefillUnavailableError, a refusal from the prefill node, or a bug
            log.warning("request %d: KV hand-off failed: %s: %s", seq.seq_id, type(exc).__name__, exc,
                        exc_info=None if isinstance(exc, AfkvError) else exc)
            kv.free(seq.seq_id)
            self._requests.pop(seq.seq_id, None)
            seq.status = SeqStatus.FINISHED
            if not isinstance(exc, RequestError | EngineError):
                exc = RequestFailedError(f"request {seq.seq_id} failed: the KV hand-off failed: "
                                         f"{type(exc).__name__}: {exc}")
            req.queue.put_nowait(exc)
            return
        req.handoff = None
        self._scheduler.add(seq)
        self._wakeup.set()

    async def export_prefill(self, token_ids: Seq[int], want: dict[int, bytes], fmt: BlockFormat | None = None,
                             into: torch.Tensor | None = None, slots: Seq[int] | None = None
                             ) -> AsyncIterator[ExportedBlocks]:
        """Prefill node: compute the KV of `token_ids` (whole blocks: a decode node computes
        the rest) in chunks, and yield the blocks `want` ({table index: chained hash}) as the
        steps that fill them end, rows in `fmt` (raw by default), written by the worker into
        `into` (uint8 [m, fmt.nbytes], host or this engine's device: the decode node's staging
        buffer) when given, the k-th smallest index asked for into its row slots[k] (default k). RequestError when a block's
        hash differs from the one asked for (the two nodes disagree on model or dtype). When the
        device pool holds every block already, they are read at once, with no step.
        Closing the iterator aborts the prefill and frees its blocks, as with `generate`; it
        returns once no write into `into` is in flight any more (its slots can then be reused)."""
        fmt = fmt or RawFormat(self._layout)
        bs = self._layout.block_size
        if len(token_ids) % bs or not want or max(want) >= len(token_ids) // bs or min(want) < 0:
            raise RequestError(f"a prefill hands over whole blocks: {len(token_ids)} tokens, blocks "
                               f"{sorted(want)[:8]} of {bs} tokens asked for")
        slots = list(range(len(want))) if slots is None else list(slots)
        if into is not None and (len(slots) != len(want) or len(set(slots)) != len(slots)
                                 or not all(0 <= k < into.shape[0] for k in slots)):
            raise RequestError(f"a prefill into {into.shape[0]} row slots needs {len(want)} distinct slots, "
                               f"got {slots[:8]}")
        self._check_running()
        hold = self._next_id
        if self._kv.hold_cached(hold, token_ids):  # every block is here already: no step to run
            self._next_id += 1
            try:
                hashes = self._kv.block_hashes(hold)
                bad = [i for i in sorted(want) if hashes[i] != want[i]]
                if bad:
                    raise RequestError(f"prefill: block {bad[0]}'s hash differs from the one asked for: the decode "
                                       "node runs another model, weights or dtype")
                future = self._kv.export_rows(hold, sorted(want), fmt, into,  # read before a later step reuses them
                                              None if into is None else slots)
            finally:
                self._kv.free(hold)
            try:
                rows = await asyncio.wrap_future(future)
            finally:
                await _settled([future])  # (cancelled while it writes into `into`)
            yield ExportedBlocks(sorted(want), [want[i] for i in sorted(want)], rows)
            return
        req = await self._add(list(token_ids), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        req.export = _Export(want, fmt, into, slots)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, CompletionChunk):
                    if req.export.want:
                        raise RequestFailedError(f"prefill request {req.seq.seq_id} ended without blocks "
                                                 f"{sorted(req.export.want)}")
                    return
                indices, hashes, future = item
                yield ExportedBlocks(indices, hashes, await asyncio.wrap_future(future))
        finally:
            export, req.export = req.export, None  # no more reads start (into `into` or anywhere)
            if req.seq.status is not SeqStatus.FINISHED and self._state is EngineState.RUNNING:
                self._aborts.add(req.seq.seq_id)
                self._wakeup.set()
            if export is not None:
                await _settled(export.issued)  # those started have written their rows

    def _export_blocks(self, step: list) -> None:
        """Prefill requests of a committed step: read the asked-for blocks that became full
        (the reads run on the worker before the next step; rows go to the request's queue)."""
        for seq, _ in step:
            req = self._requests.get(seq.seq_id)
            if req is None or req.export is None or seq.status is not SeqStatus.RUNNING:
                continue
            hashes = self._kv.block_hashes(seq.seq_id)
            ready = sorted(i for i in req.export.want if i < len(hashes))
            if not ready:
                continue
            bad = [i for i in ready if hashes[i] != req.export.want[i]]
            if bad:
                self._fail(seq, RequestError(f"prefill: block {bad[0]}'s hash differs from the one asked for: "
                                             "the decode node runs another model, weights or dtype"))
                continue
            for i in ready:
                del req.export.want[i]
            x = req.export
            future = self._kv.export_rows(seq.seq_id, ready, x.format, x.into,
                                          None if x.into is None else [x.slot_of[i] for i in ready])
            x.issued.append(future)
            req.queue.put_nowait((ready, [hashes[i] for i in ready], future))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[CompletionChunk]:
        """Stream a completion. Cancelling the consuming task (or closing the iterator) aborts
        the request and frees its KV blocks."""
        req = await self._add(prompt, params)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if req.seq.status is not SeqStatus.FINISHED and self._state is EngineState.RUNNING:
                self._aborts.add(req.seq.seq_id)
                self._wakeup.set()

    async def complete(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        chunks = [c async for c in self.generate(prompt, params)]
        last = chunks[-1]
        return Completion(
            request_id=last.request_id,
            prompt_token_ids=chunks[0].prompt_token_ids,
            token_ids=[t for c in chunks for t in c.token_ids],
            text="".join(c.text for c in chunks),
            logprobs=[lp for c in chunks for lp in c.logprobs],
            top_logprobs=None if chunks[0].top_logprobs is None else [t for c in chunks for t in c.top_logprobs],
            finish_reason=last.finish_reason,
            prompt_logprobs=chunks[0].prompt_logprobs,
            metrics=last.metrics,
        )

    # ---- the step loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_aborts()
            step = self._scheduler.schedule()
            if not step:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            plan = self._scheduler.plan(step)
            tuner = self._tuner
            if tuner is not None:
                self._runner.micro_batches = m = tuner.choose(len(plan))
                start = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._runner.execute, plan)
            except asyncio.CancelledError:
                raise
            except ExpertRowsUnavailableError as exc:
                self._fail_rows(step, plan, exc)  # the others are scheduled again: same tokens, same slots
                continue
            except StepRetryError as exc:  # nothing committed: the same step runs again
                self._num_retries += 1
                log.info("step of %d requests computed again: %s", len(step), exc)
                continue
            except Exception as exc:
                log.exception("step failed; failing its %d requests", len(step))
                for seq, _ in step:
                    if isinstance(exc, ExpertUnavailableError):
                        err = ExpertUnavailableError(f"request {seq.seq_id} failed: {exc}", layer=exc.layer,
                                                     expert=exc.expert, nodes=exc.nodes)
                    else:
                        err = RequestFailedError(f"request {seq.seq_id} failed: {exc}")
                    self._fail(seq, err)
                continue
            self._num_steps += 1
            if tuner is not None and tuner is self._tuner:
                tuner.observe(len(plan), m, time.monotonic() - start, all(len(c.token_ids) == 1 for c in plan))
                if self._num_steps % 32 == 0:
                    tuner.rule_m = self._rule_m()
            now = time.monotonic()
            done = self._scheduler.postprocess(step, plan, results, now, skip=self._aborts)
            self._export_blocks(step)  # before a finished prefill request frees its blocks
            for seq, res, finish in done:
                if seq.seq_id not in self._requests:  # a prefill request _export_blocks failed
                    continue
                if res.error is not None:  # the scheduler failed this request alone: the others go on
                    self._deliver(seq, RequestFailedError(f"request {seq.seq_id} failed: {res.error}"))
                else:
                    self._emit(seq, res, finish, now)

    def _rule_m(self) -> int:
        """MegaScale-Infer's rule m >= 2(1 + T_c/T_f), T_f = max(T_attn, T_ffn), kept in [2, 4]:
        one of the tuner's candidates."""
        t = self.layer_timings()
        t_f = max(t["attention_s"], t.get("expert_s", 0.0), 1e-9)
        return max(2, min(4, math.ceil(2 * (1 + t.get("transfer_s", 0.0) / t_f))))

    def _apply_aborts(self) -> None:
        for seq_id in self._aborts:
            req = self._requests.pop(seq_id, None)
            if req is not None and req.handoff is not None:
                req.handoff.cancel()  # frees what it holds; its sequence never reached the scheduler
                req.seq.status = SeqStatus.FINISHED
                req.seq.finish_reason = "abort"
            elif req is not None and req.seq.status is not SeqStatus.FINISHED:
                self._scheduler.abort(req.seq)
        self._aborts.clear()

    def _fail_rows(self, step: list, plan: list, exc: ExpertRowsUnavailableError) -> None:
        """End the requests of the step's failed rows (rows are the chunks' tokens in plan order).
        The step is not committed for the others: none advances, none commits KV, so each
        computes the same tokens into the same slots next step."""
        start, failed = 0, []
        for (seq, _), chunk in zip(step, plan):
            end = start + len(chunk.token_ids)
            cause = next((exc.rows[r] for r in range(start, end) if r in exc.rows), None)
            start = end
            if cause is not None:
                failed.append(seq.seq_id)
                self._fail(seq, ExpertUnavailableError(
                    f"request {seq.seq_id} failed: {cause}", layer=cause.layer, expert=cause.expert, nodes=cause.nodes))
        log.warning("step: %d of %d requests routed to experts without a live replica, ended: %s; computing "
                    "the others again", len(failed), len(step), failed)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._scheduler.fail(seq)
        self._deliver(seq, exc)

    def _deliver(self, seq: Sequence, exc: BaseException) -> None:
        """The request of an ended sequence gets `exc`."""
        req = self._requests.pop(seq.seq_id, None)
        if req is not None:
            req.queue.put_nowait(exc)

    def _emit(self, seq: Sequence, res: ChunkResult, finish: str | None, now: float) -> None:
        """Stream the token the scheduler appended: its text (a stop string ends the request
        too), and the request's end when it finished."""
        tok = res.token_id
        req = self._requests[seq.seq_id]
        text_delta, stopped = self._detokenize(req, finish is not None)
        if stopped:
            finish = "stop"
        chunk = CompletionChunk(
            request_id=seq.seq_id,
            token_ids=[tok],
            text=text_delta,
            logprobs=[res.logprob],
            top_logprobs=None if seq.top_logprobs is None else [res.top or {}],
        )
        if not req.sent_first_chunk:
            chunk.prompt_logprobs = seq.prompt_logprobs
            chunk.prompt_token_ids = seq.token_ids[: seq.num_prompt_tokens]
            req.sent_first_chunk = True
        if finish is not None:
            self._scheduler.finish(seq, finish, now)
            chunk.finish_reason = finish
            chunk.metrics = seq.metrics
            del self._requests[seq.seq_id]
        req.queue.put_nowait(chunk)

    def _detokenize(self, req: _Request, final: bool) -> tuple[str, bool]:
        """Decode the newest token incrementally -> (text to emit now, whether a stop string
        ended the request). Text that could be the start of a stop string is held back."""
        if req.text_stream is None:
            return "", False
        seq = req.seq
        text = req.held_text + req.text_stream.step(seq.token_ids[-1])
        if final:
            text += req.text_stream.finish(seq.output_ids)
        stops = seq.params.stop
        if stops:  # held_text had no match: a match ends in the new text
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                req.held_text = ""
                return text[: min(hits)], True
        if final or not stops:
            req.held_text = ""
            return text, False
        cut = max(0, len(text) - (max(map(len, stops)) - 1))
        req.held_text = text[cut:]
        return text[:cut], False
