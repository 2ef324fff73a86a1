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
    │   ├── TierError             a KV tier cannot be used (full, unwritable)
    │   ├── BlockOwnershipError   a KV block was freed twice, shared unregistered, held by the wrong
    │   │                         owner, or a sequence's table was used out of order (a bug: data at risk)
    │   └── TierAccountingError   a tier's slots, pins or byte counts disagree (a bug: data at risk)
    └── TransportError
        ├── FrameError            malformed control frame or message
        │   └── FrameTooLargeError
        ├── AuthError             peer did not prove it holds the shared token
        ├── PeerLostError         peer died or stopped answering within the timeout
        └── RemoteError           the peer failed with an error this process cannot rebuild

Rules: `assert` for internal invariants that cannot hurt data; a typed return for an expected
"no room now"; these exceptions for misuse, faults and every invariant that guards data
(block ownership, tier accounting), raised with `raise X(...) from exc` at boundaries.

Across processes (the API protocol, control-plane error replies) an error travels as
`error_to_wire(exc)`: {"class": name, "message": the message it was made with, "fields":
its keyword fields}, and `error_from_wire` rebuilds it with the same class, message and
fields. When this process has no afkv error of that name, or the fields do not fit the
class, it rebuilds the nearest afkv ancestor that takes the message alone, else a
RemoteError; either way the message is kept and `error_from_wire` never raises.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AfkvError(Exception):
    """Base class of every error afkv raises on purpose.

    `message` is the text it was made with; `wire_fields` names the keyword arguments of its
    constructor, each kept as an attribute of the same name, that travel with it."""

    wire_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message


class DeviceError(AfkvError):
    """This machine lacks the hardware or library a command needs (a GPU, two GPUs, triton)."""


class ConfigError(AfkvError):
    wire_fields = ("file", "key")

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.message = message
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


class EngineFailedError(EngineError):
    """The engine's step loop stopped on an error it cannot recover from (a bug): every request
    it held ended with this, and it takes no new ones. Close it and start a new engine."""


class ExpertUnavailableError(RequestFailedError):
    """Every expert node holding an expert (or a layer's dense MLP / shared expert) is lost."""

    wire_fields = ("layer", "expert", "nodes")

    def __init__(self, message: str, *, layer: int, expert: int | None, nodes: tuple[int, ...]):
        super().__init__(message)
        self.layer, self.expert, self.nodes = layer, expert, tuple(nodes)


class ExpertRowsUnavailableError(EngineError):
    """A step's rows (tokens, numbered in step order) routed to experts without a live replica.
    `rows` maps each such row to the first ExpertUnavailableError it met; the step's other rows
    were computed correctly, but the step as a whole returned nothing (compute them again)."""

    def __init__(self, rows: dict[int, ExpertUnavailableError]):
        first = rows[min(rows)]
        super().__init__(f"{len(rows)} row(s) of the step routed to experts without a live replica, e.g. {first}")
        self.rows = rows  # stays in its process: it crosses a wire as an EngineError with this message


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


class BlockOwnershipError(KVError):
    """A KV block's ownership broke (freed twice, shared while unregistered, registered twice,
    a table used out of order): continuing could hand one sequence another's KV."""


class TierAccountingError(KVError):
    """A tier's bookkeeping disagrees with itself (slots, pins, entries being loaded)."""


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


class RemoteError(TransportError):
    """The peer failed with an error whose class this process does not have (a newer or older
    afkv, or not an afkv error: a bug on that side). `remote_class` names it, `fields` holds
    the keyword fields it was sent with."""

    wire_fields = ("remote_class", "fields")

    def __init__(self, message: str, *, remote_class: str = "", fields: dict[str, Any] | None = None):
        super().__init__(f"{remote_class}: {message}" if remote_class else message)
        self.message = message
        self.remote_class, self.fields = remote_class, dict(fields or {})


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """{"class", "message", "fields"} of an error, for a msgpack message. An exception that is
    not an AfkvError travels by its class name and str(): the other side rebuilds a RemoteError."""
    if not isinstance(exc, AfkvError):
        return {"class": type(exc).__name__, "message": _utf8(str(exc)), "fields": {}}
    fields = {}
    for name in type(exc).wire_fields:
        value = getattr(exc, name)
        fields[name] = list(value) if isinstance(value, tuple) else _utf8(value) if isinstance(value, str) else value
    return {"class": type(exc).__name__, "message": _utf8(exc.message), "fields": fields}


def _utf8(text: str) -> str:
    """text that msgpack can encode (lone surrogates, e.g. from a user's prompt, replaced)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _afkv_errors() -> dict[str, type[AfkvError]]:
    found: dict[str, type[AfkvError]] = {}
    todo: list[type[AfkvError]] = [AfkvError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def error_from_wire(wire: object) -> AfkvError:
    """The error `error_to_wire` described, rebuilt with its class, message and fields; never
    raises (see the module docstring for what it falls back to)."""
    if not isinstance(wire, dict):
        return RemoteError(f"malformed error description {wire!r:.200}")
    name, message, fields = wire.get("class"), wire.get("message"), wire.get("fields")
    name = name if isinstance(name, str) else "?"
    message = message if isinstance(message, str) else repr(message)
    fields = fields if isinstance(fields, dict) and all(isinstance(k, str) for k in fields) else {}
    cls = _afkv_errors().get(name)
    for base in cls.__mro__ if cls is not None else ():
        if not (isinstance(base, type) and issubclass(base, AfkvError) and _rebuildable(base)):
            continue
        if base is cls and set(fields) != set(cls.wire_fields):
            continue
        try:
            return base(message, **fields) if base is cls else base(message)
        except (TypeError, ValueError):  # fields of the wrong types for this version of the class
            continue
    return RemoteError(message, remote_class=name, fields=fields)


def _rebuildable(cls: type[AfkvError]) -> bool:
    """Whether cls is built as cls(message, **wire_fields): AfkvError's own constructor, or one
    that declares its wire fields (not ExpertRowsUnavailableError, which stays in its process)."""
    return bool(cls.wire_fields) or cls.__init__ is AfkvError.__init__
