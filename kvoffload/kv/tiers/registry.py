"""Every KV tier by name (``--kv-tiers NAME:BUDGET,...``); tests are parametrised over this table.
A new tier is one file implementing :class:`~kvoffload.kv.tiers.protocol.Tier` plus one line here."""

from __future__ import annotations

from kvoffload.errors import ConfigError
from kvoffload.kv.tiers.disk import DiskTier
from kvoffload.kv.tiers.memory import DeviceTier, HostTier
from kvoffload.kv.tiers.protocol import Tier
from kvoffload.kv.tiers.ray import RayTier

TIERS: dict[str, type[Tier]] = {
    "device": DeviceTier,
    "host": HostTier,
    "disk": DiskTier,
    "ray": RayTier,
}


def tier_class(name: str) -> type[Tier]:
    """The registered tier called ``name`` (a one-line ConfigError otherwise)."""
    if name not in TIERS:
        raise ConfigError(f"unknown KV tier {name!r} (choose from {', '.join(TIERS)})")
    return TIERS[name]
