"""A machine profile: what one GPU kind with one software stack measures, and the curves fitted to it.

Written by `afkv bench calibrate` (or built in: afkv.plan.builtin), read by `afkv plan`. JSON with a
versioned schema:

    {"schema": "afkv-profile/1", "name", "machine": {...}, "software": {...}, "sources": {...},
     "hbm_bytes", "copy_bytes_per_s", "gemm_flops_per_s",
     "h2d_bytes_per_s", "d2h_bytes_per_s", "disk_read_bytes_per_s", "disk_write_bytes_per_s",
     "link": {"kind", "points": [{"out_bytes", "back_bytes", "seconds"}]} | {"kind", "latency_s", "bytes_per_s"},
     "calibrations": [{"model": {HF config.json fields}, "name", "copy_bytes_per_s",
                       "attention": [{"seqs", "context", "layers", "seconds"}],
                       "ffn": [{"tokens", "pairs", "touched", "layers", "seconds"}]}],
     "af": {"round_trip_overhead_s", "step_overhead_s", "overlap", "expert_batching"},
     "kv_formats": [{"name", "bytes_ratio", "read_efficiency"}],
     "fitted": {model or "*": {kernel figures}}}   (written for reading; fitted again on load)

Points are the source of truth; kernel figures are fitted when the profile is built (one fit per
calibrated model, and one over all of them for models the profile has not seen). Each calibration
keeps the copy ceiling of the run that measured it, so the byte terms are read against the
ceiling of that run; the kernel figures then time bytes at this profile's ceiling (the same
machine, or another GPU kind with the same software: Profile.scaled).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from afkv.errors import AfkvError, ConfigError
from afkv.model.spec import spec_from_hf_config
from afkv.plan.kernels import AttentionPoint, FfnPoint, Kernels, Link, LinkPoint, fit_kernels, fit_link
from afkv.plan.shapes import Shapes

SCHEMA = "afkv-profile/1"
EXPERT_BATCHING = ("per_attention_node", "merged")  # afkv.config's [deployment] expert_batching (plan sits below config)


@dataclass(frozen=True)
class Calibration:
    """Measured points of one model's shapes."""

    name: str
    model: Mapping[str, Any]  # HF config.json fields
    copy_bytes_per_s: float  # the copy ceiling measured with these points
    attention: tuple[AttentionPoint, ...]
    ffn: tuple[FfnPoint, ...]

    @property
    def shapes(self) -> Shapes:
        return Shapes.from_spec(spec_from_hf_config(dict(self.model), source=self.name), self.name)


@dataclass(frozen=True)
class AfRuntime:
    """How the runtime joins the two sides, beyond the link and the kernels.

    round_trip_overhead_s  an A->F->A round trip of one micro-batch inside a step, minus the
                           expert's compute and the bare link round trip (buffer packing, stream
                           events, NCCL kernel starts)
    step_overhead_s        once per step: announcing the step to the expert nodes
    overlap                share of the time ping-pong could hide that the runtime hides: 0 = an
                           attention node's micro-batches run one after another (serial), 1 = the
                           attention of micro-batch i+1 fully overlaps the experts' work on i
                           (MegaScale-Infer's ping-pong); afkv's stored runs sit in between
    expert_batching        "per_attention_node": an expert node runs each attention node's
                           micro-batch apart, reading the weights again (afkv's default);
                           "merged": one launch per layer and micro-batch for all attention
                           nodes' rows (afkv's [deployment] expert_batching = "merged", not yet
                           measured on GPUs: the model assumes full amortization)
    """

    round_trip_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    overlap: float = 0.0
    expert_batching: str = "per_attention_node"

    def __post_init__(self) -> None:
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap <= 1:
            raise ConfigError(f"overlap must be a number in [0, 1], got {self.overlap!r}", key="af.overlap")
        for key in ("round_trip_overhead_s", "step_overhead_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key} must be a number >= 0, got {value!r}", key=f"af.{key}")
        if self.expert_batching not in EXPERT_BATCHING:
            raise ConfigError(f"expert_batching must be one of {', '.join(EXPERT_BATCHING)}, got "
                              f"{self.expert_batching!r}", key="af.expert_batching")


@dataclass(frozen=True)
class KVFormatCost:
    """A device KV format: bytes per token against the model dtype, and how fast attention reads it
    against the model dtype's kernel (1.0: as fast)."""

    name: str
    bytes_ratio: float
    read_efficiency: float


@dataclass(frozen=True)
class Profile:
    name: str
    hbm_bytes: int
    copy_bytes_per_s: float
    gemm_flops_per_s: float
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    link_kind: str
    link: Link
    link_points: tuple[LinkPoint, ...]
    calibrations: tuple[Calibration, ...]
    af: AfRuntime
    kv_formats: tuple[KVFormatCost, ...] = (KVFormatCost("auto", 1.0, 1.0),)
    machine: Mapping[str, Any] = field(default_factory=dict, compare=False)
    software: Mapping[str, Any] = field(default_factory=dict, compare=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)  # figure -> where it comes from
    fits: Mapping[str, Kernels] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("hbm_bytes", "copy_bytes_per_s", "gemm_flops_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s",
                    "disk_read_bytes_per_s", "disk_write_bytes_per_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{key} must be a positive number, got {value!r}", key=key)
        if not self.calibrations:
            raise ConfigError("a profile needs calibrations (attention and FFN points)", key="calibrations")
        sets = [(c.shapes, c) for c in self.calibrations]
        fits = {c.name: fit_kernels([(sh, list(c.attention), c.copy_bytes_per_s)],
                                    [(sh, list(c.ffn), c.copy_bytes_per_s)], self.copy_bytes_per_s, self.gemm_flops_per_s)
                for sh, c in sets}
        fits["*"] = fit_kernels([(sh, list(c.attention), c.copy_bytes_per_s) for sh, c in sets],
                                [(sh, list(c.ffn), c.copy_bytes_per_s) for sh, c in sets], self.copy_bytes_per_s,
                                self.gemm_flops_per_s)
        object.__setattr__(self, "fits", MappingProxyType(fits))
        object.__setattr__(self, "machine", MappingProxyType(dict(self.machine)))
        object.__setattr__(self, "software", MappingProxyType(dict(self.software)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def kernels(self, sh: Shapes) -> tuple[Kernels, str]:
        """-> (kernel figures for a model, which calibration they come from): the model's own when
        the profile calibrated the same shapes, else the fit over every calibrated model."""
        for c in self.calibrations:
            if c.shapes.signature() == sh.signature():
                return self.fits[c.name], c.name
        return self.fits["*"], "all calibrated models"

    def kv_format(self, name: str) -> KVFormatCost:
        for f in self.kv_formats:
            if f.name == name:
                return f
        raise ConfigError(f"the profile has no KV format {name!r}; it has {', '.join(f.name for f in self.kv_formats)}",
                          key="kv_formats")

    def scaled(self, name: str, hbm_bytes: int, copy_bytes_per_s: float, sources: Mapping[str, str]) -> "Profile":
        """Another GPU kind with the same software: kernel floors and efficiencies as fitted here,
        bytes timed at its copy ceiling (an estimate until that GPU is calibrated)."""
        return dataclasses.replace(self, name=name, hbm_bytes=hbm_bytes, copy_bytes_per_s=copy_bytes_per_s,
                                   sources=dict(self.sources) | dict(sources))

    # ---- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        link: dict[str, Any] = {"kind": self.link_kind}
        if self.link_points:
            link["points"] = [dataclasses.asdict(p) for p in self.link_points]
        else:
            link |= dataclasses.asdict(self.link)
        out = {
            "schema": SCHEMA, "name": self.name, "machine": dict(self.machine), "software": dict(self.software),
            "sources": dict(self.sources), "hbm_bytes": self.hbm_bytes, "copy_bytes_per_s": self.copy_bytes_per_s,
            "gemm_flops_per_s": self.gemm_flops_per_s, "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "d2h_bytes_per_s": self.d2h_bytes_per_s, "disk_read_bytes_per_s": self.disk_read_bytes_per_s,
            "disk_write_bytes_per_s": self.disk_write_bytes_per_s, "link": link,
            "calibrations": [{"name": c.name, "model": dict(c.model), "copy_bytes_per_s": c.copy_bytes_per_s,
                              "attention": [dataclasses.asdict(p) for p in c.attention],
                              "ffn": [dataclasses.asdict(p) for p in c.ffn]} for c in self.calibrations],
            "af": dataclasses.asdict(self.af),
            "kv_formats": [dataclasses.asdict(f) for f in self.kv_formats],
            "fitted": {name: k.to_json() for name, k in self.fits.items()},  # informational: refitted on load
        }  # fmt: skip
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | None = None) -> "Profile":
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, file=source, key=key)

        need(isinstance(data, dict), "", "a profile is a JSON object")
        need(data.get("schema") == SCHEMA, "schema",
             f"unknown profile schema {data.get('schema')!r} (this afkv reads {SCHEMA!r}); write it again with "
             "afkv bench calibrate")

        def get(obj: dict, key: str, where: str):
            need(key in obj, f"{where}{key}", f"missing {where}{key}")
            return obj[key]

        def points(cls_, items, where: str):
            need(isinstance(items, list), where, f"{where} must be a list")
            names = [f.name for f in dataclasses.fields(cls_)]
            out = []
            for i, item in enumerate(items):
                need(isinstance(item, dict) and set(item) == set(names), f"{where}[{i}]",
                     f"{where}[{i}] must have exactly the fields {', '.join(names)}")
                for k in names:
                    v = item[k]
                    need(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0, f"{where}[{i}].{k}",
                         f"{where}[{i}].{k} must be a number >= 0, got {v!r}")
                need(item.get("seconds", 1) > 0, f"{where}[{i}].seconds", f"{where}[{i}].seconds must be positive")
                out.append(cls_(**item))
            return tuple(out)

        try:
            link_data = get(data, "link", "")
            need(isinstance(link_data, dict), "link", "link must be an object")
            link_points = points(LinkPoint, link_data["points"], "link.points") if "points" in link_data else ()
            link = fit_link(list(link_points)) if link_points else Link(float(get(link_data, "latency_s", "link.")),
                                                                        float(get(link_data, "bytes_per_s", "link.")))
            cals = []
            for i, c in enumerate(get(data, "calibrations", "")):
                where = f"calibrations[{i}]."
                model = get(c, "model", where)
                need(isinstance(model, dict), f"{where}model", f"{where}model must be a config.json object")
                copy = get(c, "copy_bytes_per_s", where)
                need(not isinstance(copy, bool) and isinstance(copy, (int, float)) and copy > 0,
                     f"{where}copy_bytes_per_s", f"{where}copy_bytes_per_s must be a positive number")
                cals.append(Calibration(str(get(c, "name", where)), MappingProxyType(dict(model)), float(copy),
                                        points(AttentionPoint, get(c, "attention", where), f"{where}attention"),
                                        points(FfnPoint, get(c, "ffn", where), f"{where}ffn")))
            af = AfRuntime(**get(data, "af", ""))
            formats = tuple(KVFormatCost(**f) for f in data.get("kv_formats", [{"name": "auto", "bytes_ratio": 1.0,
                                                                                  "read_efficiency": 1.0}]))
            return cls(
                name=str(get(data, "name", "")), hbm_bytes=get(data, "hbm_bytes", ""),
                copy_bytes_per_s=get(data, "copy_bytes_per_s", ""), gemm_flops_per_s=get(data, "gemm_flops_per_s", ""),
                h2d_bytes_per_s=get(data, "h2d_bytes_per_s", ""), d2h_bytes_per_s=get(data, "d2h_bytes_per_s", ""),
                disk_read_bytes_per_s=get(data, "disk_read_bytes_per_s", ""),
                disk_write_bytes_per_s=get(data, "disk_write_bytes_per_s", ""), link_kind=str(link_data.get("kind", "")),
                link=link, link_points=link_points, calibrations=tuple(cals), af=af, kv_formats=formats,
                machine=data.get("machine", {}), software=data.get("software", {}), sources=data.get("sources", {}),
            )  # fmt: skip
        except ConfigError as exc:
            if exc.file is not None or source is None:
                raise
            msg, suffix = str(exc), f" (key {exc.key!r})"
            raise ConfigError(msg.removesuffix(suffix) if exc.key else msg, file=source, key=exc.key) from exc
        except AfkvError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid profile: {exc}", file=source) from exc


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError("profile not found (write one with: afkv bench calibrate)", file=str(path)) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the profile: {exc}", file=str(path)) from exc
    return Profile.from_json(data, source=str(path))


def save_profile(profile: Profile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=2))
    return path
