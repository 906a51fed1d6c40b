"""Name -> class tables for losses and pair weightings."""

from __future__ import annotations

LOSSES: dict[str, type] = {}
PAIR_WEIGHTINGS: dict[str, type] = {}


def register_loss(name: str):
    def add(cls):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = cls
        return cls

    return add


def register_pair_weighting(name: str):
    def add(cls):
        PAIR_WEIGHTINGS[name] = cls
        return cls

    return add


def lookup(table: dict[str, type], name: str, what: str) -> type:
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]
