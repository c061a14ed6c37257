"""Measuring helpers shared by the evaluation and the benchmarks: RSS, peak RSS, PSNR, percentiles.

    >>> from smash_build.evaluate.measure import PeakRss, psnr_db
    >>> with PeakRss() as memory:
    ...     image = pipe("a cat").images[0]
    >>> memory.peak                           # highest resident bytes while the block ran
    >>> psnr_db(image_tensor, reference)      # dB, inf when identical
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Sequence

__all__ = ["PeakRss", "p90", "psnr_db", "rss"]


def rss() -> int:
    """This process's resident memory, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Highest process RSS between ``start()`` and ``stop()`` (or over a ``with`` block), sampled by a thread.

    torch releases the GIL in its kernels, so the sampler sees the peaks they make.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = self.start_rss = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss())

    def start(self) -> PeakRss:
        self.peak = self.start_rss = rss()
        self._thread.start()
        return self

    def current(self) -> int:
        """The peak so far, including right now."""
        self.peak = max(self.peak, rss())
        return self.peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.current()

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def psnr_db(image, reference, data_range: float = 1.0) -> float:
    """PSNR in dB of the tensor ``image`` against ``reference``; inf when they are identical.

    ``data_range`` is the span of valid values (1 for images in [0, 1]).
    """
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (inclusive method); the value itself for a single sample."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]
