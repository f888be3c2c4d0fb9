"""A test-only KV tier: host memory whose worker answers from another thread after an injected
latency (a stand-in for a remote shard). It is one file plus one registry line (in conftest.py),
and the whole placement / exactness matrix runs through it with no other change."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from kvoffload.kv.tiers.memory import HostTier
from kvoffload.kv.tiers.protocol import AttendRequest, AttendResult

LATENCY_S = 0.002


class LatencyTier(HostTier):
    """Attention computed asynchronously, ``LATENCY_S`` after each request; reads delayed too."""

    def submit(self, req: AttendRequest) -> None:
        self._result: AttendResult | None = None

        def work() -> None:
            time.sleep(LATENCY_S)
            super(LatencyTier, self).submit(req)
            self._result = super(LatencyTier, self).collect()

        self._thread = threading.Thread(target=work)
        self._thread.start()

    def collect(self) -> AttendResult:
        self._thread.join()
        return self._result

    def read(self, slots: np.ndarray) -> torch.Tensor:
        time.sleep(LATENCY_S)
        return super().read(slots)
