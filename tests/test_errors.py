"""Errors crossing a process keep their class, message and fields (afkv.errors wire form)."""

import msgpack
import pytest

from afkv import errors
from afkv.errors import error_from_wire, error_to_wire

CASES = [
    errors.ConfigError("bad value", file="d.toml", key="deployment.port"),
    errors.ConfigError("no file"),
    errors.ExpertUnavailableError("expert lost", layer=3, expert=5, nodes=(0, 2)),
    errors.ExpertUnavailableError("dense part lost", layer=1, expert=None, nodes=(1,)),
    errors.PromptTooLongError("too long"),
    errors.InvalidSamplingParamsError("temperature"),
    errors.EngineClosedError("closed"),
    errors.TierError("disk full"),
    errors.FrameTooLargeError("big"),
    errors.RemoteError("boom", remote_class="NewError", fields={"x": 1}),
]


@pytest.mark.parametrize("exc", CASES, ids=lambda e: type(e).__name__)
def test_round_trip_keeps_class_message_and_fields(exc):
    wire = msgpack.unpackb(msgpack.packb(error_to_wire(exc)))  # as a peer decodes it
    back = error_from_wire(wire)
    assert type(back) is type(exc) and str(back) == str(exc)
    for name in type(exc).wire_fields:
        assert getattr(back, name) == getattr(exc, name)


def test_what_cannot_be_rebuilt_keeps_the_message():
    # a class this process lacks
    back = error_from_wire({"class": "ErrorFromTheFuture", "message": "m", "fields": {"a": 1}})
    assert isinstance(back, errors.RemoteError) and back.remote_class == "ErrorFromTheFuture" and "m" in str(back)
    # fields that do not fit: the nearest ancestor built from the message alone
    back = error_from_wire({"class": "ExpertUnavailableError", "message": "m", "fields": {"layer": 1}})
    assert type(back) is errors.RequestFailedError and str(back) == "m"
    # a class that stays in its process
    rows = errors.ExpertRowsUnavailableError({0: CASES[2]})
    back = error_from_wire(error_to_wire(rows))
    assert type(back) is errors.EngineError and str(back) == str(rows)
    # not an afkv error, or garbage
    assert isinstance(error_from_wire(error_to_wire(KeyError("k"))), errors.RemoteError)
    for junk in (None, 5, {"class": 1}, {"class": "ConfigError", "message": b"x", "fields": []}):
        assert isinstance(error_from_wire(junk), errors.AfkvError)


def test_messages_with_lone_surrogates_still_encode():
    wire = error_to_wire(errors.RequestError("prompt \ud800 is odd"))
    assert str(error_from_wire(msgpack.unpackb(msgpack.packb(wire)))).startswith("prompt ")
