"""Metrics of a serving engine: one list of samples, shown as Prometheus text (`/metrics`)
and as a table (`afkv run --stats`).

    engine_samples(engine)  what the engine reports through its public methods: requests
                            running / waiting, tokens, KV blocks per tier, prefix hits per
                            tier, bytes spilled and promoted, mean per-layer AF timings and,
                            with EPLB, max/mean tokens per expert node. An Engine, or an
                            AttachedEngine (one sample per attention node).
    ServerMetrics           the HTTP server's own: requests by endpoint and outcome, TTFT,
                            inter-token latency and end-to-end histograms; on a scrape it
                            adds the engine's samples (read on the event loop, the engine's
                            owner thread).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from afkv.engine.engine import Engine, EngineStats
from afkv.engine.params import RequestMetrics
from afkv.errors import AfkvError
from afkv.kv.metrics import KVMetricsSnapshot

PREFIX = "afkv_"


@dataclass(frozen=True)
class Sample:
    name: str  # without the afkv_ prefix; counters without _total
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


_STATS = (  # EngineStats field -> (metric, kind, help)
    ("num_running", "num_requests_running", "gauge", "Requests in the running batch"),
    ("num_waiting", "num_requests_waiting", "gauge", "Requests waiting to be scheduled"),
    ("num_blocks", "kv_device_blocks", "gauge", "KV blocks of the device tier"),
    ("num_free_blocks", "kv_device_free_blocks", "gauge", "Device KV blocks not held by a request (cached ones included)"),
    ("num_prompt_tokens", "prompt_tokens", "counter", "Prompt tokens admitted"),
    ("num_cached_prompt_tokens", "cached_prompt_tokens", "counter", "Prompt tokens served from the prefix cache"),
    ("num_generated_tokens", "generation_tokens", "counter", "Tokens generated"),
    ("num_steps", "steps", "counter", "Engine steps"),
    ("num_preemptions", "preemptions", "counter", "Requests preempted (KV blocks ran out)"),
    ("num_step_retries", "step_retries", "counter", "Steps computed again (data plane out of room, node lost)"),
    ("num_handoffs", "num_requests_handing_off", "gauge", "Requests whose prompt KV a prefill node is handing over"),
)
_MOVES = (  # KV metrics counter -> (metric, label)
    ("bytes_device_to_host", "kv_spilled_bytes", ("to", "host")),
    ("bytes_host_to_disk", "kv_spilled_bytes", ("to", "disk")),
    ("bytes_host_to_device", "kv_promoted_bytes", ("from", "host")),
    ("bytes_disk_to_host", "kv_promoted_bytes", ("from", "disk")),
    ("bytes_device_to_stream", "kv_spilled_bytes", ("to", "stream")),
)
_STREAMED = (  # KV metrics counter -> (metric, help): long contexts streamed from host memory (afkv.kv.stream)
    ("bytes_streamed", "kv_streamed_bytes", "KV bytes attention streamed from the stream store (host memory), all steps"),
    ("streamed_steps", "kv_streamed_steps", "Steps that streamed KV from host memory (bytes per step: the ratio)"),
)


async def _node_views(engine) -> list[tuple[EngineStats, dict[str, float], KVMetricsSnapshot]]:
    """(stats, layer timings, KV metrics) of each attention node: the Engine itself, or those an
    AttachedEngine asks its attention nodes for (one round trip each)."""
    if isinstance(engine, Engine):
        return [(engine.stats(), engine.layer_timings(), engine.kv_metrics())]
    return [(m.stats, m.layer, m.kv) for m in await engine.node_metrics()]


async def engine_samples(engine) -> list[Sample]:
    """The engine's metrics now (run on the engine's event loop), labelled by attention node."""
    out: list[Sample] = []
    for i, (stats, layer, kv) in enumerate(await _node_views(engine)):
        node_label = (("node", str(i)),)
        d = dataclasses.asdict(stats)
        for key, name, kind, help_ in _STATS:
            out.append(Sample(name, kind, help_, node_label, float(d[key])))
        for key, seconds in layer.items():
            out.append(Sample("layer_seconds", "gauge", "Mean seconds per micro-batch layer, by part (AF timings)",
                              node_label + (("part", key.removesuffix("_s")),), float(seconds)))
        for tier in kv.tiers:
            labels = node_label + (("tier", tier.name),)
            out.append(Sample("kv_tier_blocks", "gauge", "KV blocks held per tier (device: in use or cached)", labels,
                              tier.num_blocks))
            out.append(Sample("kv_tier_capacity_blocks", "gauge", "KV block capacity per tier", labels,
                              tier.capacity_blocks))
        for tier, n in kv.hit_blocks.items():
            out.append(Sample("kv_hit_blocks", "counter", "Prefix-cache hits in blocks, by the tier they were found in",
                              node_label + (("tier", tier),), n))
        for key, name, label in _MOVES:
            what = "spilled down to" if name == "kv_spilled_bytes" else "promoted up from"
            out.append(Sample(name, "counter", f"KV bytes {what} a tier", node_label + (label,),
                              kv.counters.get(key, 0)))
        for key, name, help_ in _STREAMED:
            out.append(Sample(name, "counter", help_, node_label, kv.counters.get(key, 0)))
        steps = kv.counters.get("streamed_steps", 0)
        out.append(Sample("kv_streamed_bytes_per_step", "gauge", "Mean KV bytes streamed from host memory per step "
                          "that streamed", node_label, kv.counters.get("bytes_streamed", 0) / steps if steps else 0.0))
        out.append(Sample("kv_handoff_received_blocks", "counter", "KV blocks received from prefill nodes (PD)",
                          node_label, kv.counters.get("handoff_received_blocks", 0)))
        out.append(Sample("kv_handoff_shared_blocks", "counter", "Prompt KV blocks a PD hand-off found held already "
                          "(not transferred)", node_label, kv.counters.get("handoff_shared_blocks", 0)))
        out.append(Sample("kv_handoff_staging_live_buffers", "gauge", "PD hand-off staging buffers of this node's "
                          "links not yet freed", node_label, kv.counters.get("handoff_staging_live_buffers", 0)))
        out.append(Sample("kv_handoff_unsettled_offers", "gauge", "PD device staging buffers whose offer is being "
                          "settled with the prefill node", node_label, kv.counters.get("handoff_unsettled_offers", 0)))
        out.append(Sample("kv_handoff_released_for_exited_prefill", "counter", "PD device staging buffers whose CUDA "
                          "IPC count was released for a prefill process that exited holding them", node_label,
                          kv.counters.get("handoff_released_for_exited_prefill", 0)))
    if getattr(engine, "eplb_enabled", False):
        try:
            value = await engine.expert_balancedness()
        except AfkvError:  # no expert node answered: this scrape goes without it
            value = None
        if value is not None:
            out.append(Sample("eplb_max_mean_load", "gauge", "Max / mean tokens per expert node over the EPLB window",
                              (), value))
    return out


def format_samples(samples: list[Sample]) -> str:
    """A table for people: one line per sample."""
    lines = []
    for s in samples:
        labels = ",".join(f"{k}={v}" for k, v in s.labels)
        value = f"{s.value:.6f}" if s.name == "layer_seconds" or s.name.startswith("eplb") else f"{s.value:.0f}"
        lines.append(f"  {s.name + (f'{{{labels}}}' if labels else ''):<44} {value:>14}")
    return "\n".join(lines)


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Owner: the server's event loop. A registry of its own (servers in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and outcome "
                                "(stop, length, abort: the client left, error_4xx / error_5xx)",
                                ["endpoint", "outcome"], registry=r)
        self.in_progress = Gauge(PREFIX + "http_requests_in_progress", "HTTP generation requests being served",
                                 registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a request",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.completion_tokens = Counter(PREFIX + "request_completion_tokens", "Tokens sent to HTTP clients",
                                         registry=r)
        self._engine_samples: list[Sample] = []
        r.register(_SampleCollector(self))

    def finished(self, endpoint: str, outcome: str, metrics: RequestMetrics | None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        if metrics is None:
            return
        if metrics.ttft_s is not None:
            self.ttft.observe(metrics.ttft_s)
        for gap in metrics.itl_s:
            self.itl.observe(gap)
        if metrics.e2e_s is not None:
            self.e2e.observe(metrics.e2e_s)

    async def exposition(self, engine) -> bytes:
        """Prometheus text: the server's metrics and the engine's, read now."""
        self._engine_samples = await engine_samples(engine)
        return generate_latest(self.registry)


class _SampleCollector:
    def __init__(self, owner: ServerMetrics):
        self._owner = owner

    def describe(self):
        return []  # samples vary with the engine: nothing to check at registration

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for s in self._owner._engine_samples:
            fam = families.get(s.name)
            if fam is None:
                cls = GaugeMetricFamily if s.kind == "gauge" else CounterMetricFamily
                fam = families[s.name] = cls(PREFIX + s.name, s.help, labels=[k for k, _ in s.labels])
            fam.add_metric([v for _, v in s.labels], s.value)
        yield from families.values()
