"""Checks of the invariants that guard KV data: typed errors (afkv.errors) that `python -O`
keeps, unlike `assert`.

    owned(ok, message)      block ownership: ref counts, registration, who holds a block or slot
    accounted(ok, message)  tier accounting: slots, pins, entries loading, capacities
"""

from __future__ import annotations

from afkv.errors import BlockOwnershipError, TierAccountingError


def owned(ok: bool, message: str) -> None:
    if not ok:
        raise BlockOwnershipError(message)


def accounted(ok: bool, message: str) -> None:
    if not ok:
        raise TierAccountingError(message)
