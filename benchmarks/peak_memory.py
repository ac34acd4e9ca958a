"""This process's peak resident memory, sampled in a thread, for the memory benchmarks that run one phase per child."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil


class PeakRss:
    """`with PeakRss() as peak: ...` then `peak.bytes`: the largest RSS seen every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.bytes = interval, 0
        self._done = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            self.bytes = max(self.bytes, me.memory_info().rss)
            time.sleep(self.interval)

    def start(self) -> PeakRss:
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self.bytes = max(self.bytes, psutil.Process().memory_info().rss)
        self._done.set()
        return self.bytes

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
