"""Phase timings of a load (read weights, rebuild, move to device, compile, warm-up).

    >>> timer = PhaseTimer()
    >>> with timer.phase("read_weights"):
    ...     state_dict = load_file(path)
    >>> timer.phases
    {'read_weights': 0.41}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("smash_runtime")


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase; a phase entered twice accumulates.

    ``sync=True`` waits for queued CUDA work at both ends of each phase, so a phase that only
    enqueues kernels (a ``.to("cuda")``) is charged for them rather than the next one.
    """

    phases: dict[str, float] = field(default_factory=dict)
    sync: bool = True

    def _sync(self) -> None:
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            self.phases[name] = self.phases.get(name, 0.0) + seconds
            logger.info("phase %s: %.3f s", name, seconds)

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        """Rounded copy, for logs and JSON."""
        return {name: round(seconds, digits) for name, seconds in self.phases.items()}

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases.items())
