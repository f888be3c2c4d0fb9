"""matplotlib, when installed, set up for writing files (shared by the bench and eval reports)."""

from __future__ import annotations


def pyplot():
    """``(matplotlib.pyplot, None)``, or ``(None, reason)`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install matplotlib)"
    return plt, None
