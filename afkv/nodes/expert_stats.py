"""ExpertStats: an expert node's counters, behind one owner.

Link threads (steps), the worker thread (weight copies, checkpoint reads) and the event loop
(the `stats` answer) all count. Every change and every read goes through a method here,
under `_lock`; nothing else touches the fields.

FFN time of eager steps is measured with events (CUDA events on GPUs: they complete later)
and settled lazily: `settle` adds the finished ones, `take_compute_s` hands an attention
node the seconds settled for its steps since it last asked (its step answers carry them).
An FFN call over a merged bundle of several attention nodes' rows (ExpertPlane,
`expert_batching = "merged"`) counts once in `compute_s` and whole in each member's
seconds: each of them waited for all of it.

Launch counters: `bundles` (step runs: one per attention node's step, or one per merged
bundle), `bundle_links` (attention nodes' steps they carried), `ffn_launches` (FFN calls
issued or replayed: one per layer and micro-batch slot of a run, however many attention
nodes' rows it held), `gather_timeouts` (merged runs that started without an attention node
that had been stepping: it became idle, or late by more than the gather bound).
`links_dropped`: attention nodes' data planes dropped because their control connection ended.
"""

from __future__ import annotations

import threading


class ExpertStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0  # steps answered
        self._tokens = 0  # rows of those steps (buffer capacities)
        self._batches = 0  # FFN calls timed
        self._bundles = 0  # step runs (a merged bundle counts once)
        self._bundle_links = 0  # attention nodes' steps those runs carried
        self._ffn_launches = 0  # FFN calls of those runs, eager or replayed
        self._gather_timeouts = 0  # merged runs that started without an active attention node
        self._links_dropped = 0  # data planes dropped when their attention node's connection ended
        self._compute_s = 0.0
        self._experts_received = 0  # (layer, expert) copies received from other expert nodes
        self._received_bytes = 0
        self._nccl_received_bytes = 0  # of received_bytes, those that came over NCCL (GPU to GPU)
        self._experts_from_checkpoint = 0  # gained experts no live peer could give (start-up not counted)
        self._timed: list[tuple[str, object, object]] = []  # (attention node, start, end) events not yet settled
        self._unreported: dict[str, float] = {}  # attention node -> settled FFN seconds not yet answered

    def step(self, num_rows: int) -> None:
        with self._lock:
            self._requests += 1
            self._tokens += num_rows

    def bundle(self, num_links: int, num_ffn: int) -> None:
        """A step run carried `num_links` attention nodes' steps in `num_ffn` FFN calls."""
        with self._lock:
            self._bundles += 1
            self._bundle_links += num_links
            self._ffn_launches += num_ffn

    def gather_timeout(self) -> None:
        with self._lock:
            self._gather_timeouts += 1

    def link_dropped(self) -> None:
        with self._lock:
            self._links_dropped += 1

    def time_ffn(self, attentions: tuple[str, ...], start, end) -> None:
        """An FFN call over the rows of `attentions`' steps, between two recorded events."""
        with self._lock:
            self._timed.append((attentions, start, end))

    def settle(self, wait: bool) -> None:
        """Add the timed FFN calls whose events have passed (all of them when `wait`)."""
        with self._lock:
            timed, self._timed = self._timed, []
        done, pending = [], []
        for attentions, start, end in timed:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((attentions, start, end))
                continue
            done.append((attentions, start.elapsed_time(end) / 1e3))
        with self._lock:
            self._timed = pending + self._timed
            for attentions, seconds in done:
                self._compute_s += seconds
                self._batches += 1
                for attention in attentions:
                    self._unreported[attention] = self._unreported.get(attention, 0.0) + seconds

    def take_compute_s(self, attention: str) -> float:
        """FFN seconds of `attention`'s steps settled since the last call."""
        with self._lock:
            return self._unreported.pop(attention, 0.0)

    def received(self, num_experts: int, nbytes: int, nccl_bytes: int) -> None:
        with self._lock:
            self._experts_received += num_experts
            self._received_bytes += nbytes
            self._nccl_received_bytes += nccl_bytes

    def read_from_checkpoint(self, num_experts: int) -> None:
        with self._lock:
            self._experts_from_checkpoint += num_experts

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._timed)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self._requests, "tokens": self._tokens, "batches": self._batches,
                    "bundles": self._bundles, "bundle_links": self._bundle_links, "ffn_launches": self._ffn_launches,
                    "gather_timeouts": self._gather_timeouts, "links_dropped": self._links_dropped,
                    "compute_s": self._compute_s, "experts_received": self._experts_received,
                    "received_bytes": self._received_bytes, "nccl_received_bytes": self._nccl_received_bytes,
                    "experts_from_checkpoint": self._experts_from_checkpoint}
