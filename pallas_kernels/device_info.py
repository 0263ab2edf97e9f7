"""What the kernels' default grids read from the device they run on."""

from __future__ import annotations

import jax

# The SM count the default grids assume where the device reports none (interpret mode on a
# CPU): the H100 / H200 SXM's, so an interpret-mode run lays out the grid a tuned GPU gets.
FALLBACK_SMS = 132


def sm_count(device=None) -> int | None:
    """The device's streaming-multiprocessor count (``core_count``), None where it reports
    none (CPU devices)."""
    device = device or jax.devices()[0]
    n = getattr(device, "core_count", None)
    return int(n) if n else None
