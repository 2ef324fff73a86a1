"""The one exception hierarchy of afkv.

    AfkvError
    ├── ConfigError               a config file or value is wrong (names file and key)
    ├── ModelError
    │   ├── CheckpointError       checkpoint files missing, truncated or inconsistent
    │   └── UnsupportedModelError architecture or feature afkv does not implement
    ├── RequestError              a request is invalid; the engine keeps serving
    │   ├── EmptyPromptError
    │   ├── PromptTooLongError
    │   └── InvalidSamplingParamsError
    ├── EngineError
    │   ├── EngineClosedError     the engine is not running (not started, closed, failed)
    │   ├── RequestFailedError    a request ended by a fault (expert node lost, ...)
    │   │   └── ExpertUnavailableError  an expert (or dense MLP) it routed to has no live replica
    │   └── ExpertRowsUnavailableError  some rows (tokens) of a step need an expert with no live
    │                                   replica: the engine ends their requests only
    ├── KVError
    │   ├── CorruptBlockError     a stored KV block failed its checksum or is unreadable
    │   └── TierError             a KV tier cannot be used (full, unwritable)
    └── TransportError
        ├── FrameError            malformed control frame
        ├── FrameTooLargeError
        ├── AuthError             peer did not present the shared token
        └── PeerLostError         peer died or stopped answering within the timeout

Rules: `assert` for internal invariants; a typed return for an expected
"no room now"; these exceptions for misuse and faults, raised with
`raise X(...) from exc` at boundaries.
"""

from __future__ import annotations


class AfkvError(Exception):
    """Base class of every error afkv raises on purpose."""


class DeviceError(AfkvError):
    """This machine lacks the hardware or library a command needs (a GPU, two GPUs, triton)."""


class ConfigError(AfkvError):
    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


class ModelError(AfkvError):
    pass


class CheckpointError(ModelError):
    pass


class UnsupportedModelError(ModelError):
    pass


class RequestError(AfkvError, ValueError):
    pass


class EmptyPromptError(RequestError):
    pass


class PromptTooLongError(RequestError):
    pass


class InvalidSamplingParamsError(RequestError):
    pass


class EngineError(AfkvError):
    pass


class EngineClosedError(EngineError):
    pass


class RequestFailedError(EngineError):
    pass


class ExpertUnavailableError(RequestFailedError):
    """Every expert node holding an expert (or a layer's dense MLP / shared expert) is lost."""

    def __init__(self, message: str, *, layer: int, expert: int | None, nodes: tuple[int, ...]):
        super().__init__(message)
        self.layer, self.expert, self.nodes = layer, expert, nodes


class ExpertRowsUnavailableError(EngineError):
    """A step's rows (tokens, numbered in step order) routed to experts without a live replica.
    `rows` maps each such row to the first ExpertUnavailableError it met; the step's other rows
    were computed correctly, but the step as a whole returned nothing (compute them again)."""

    def __init__(self, rows: dict[int, ExpertUnavailableError]):
        first = rows[min(rows)]
        super().__init__(f"{len(rows)} row(s) of the step routed to experts without a live replica, e.g. {first}")
        self.rows = rows


class StepRetryError(EngineError):
    """A step returned nothing and is computed again, unchanged, by the next step: the
    fixed-buffer data plane ran out of room for a peer (capacities grow first), or lost an
    expert node whose experts have replicas (routing skips it next time)."""


class KVError(AfkvError):
    pass


class CorruptBlockError(KVError):
    pass


class TierError(KVError):
    pass


class TransportError(AfkvError):
    pass


class FrameError(TransportError):
    pass


class FrameTooLargeError(FrameError):
    pass


class AuthError(TransportError):
    pass


class PeerLostError(TransportError):
    pass
