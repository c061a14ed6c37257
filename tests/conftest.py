"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Hashes remembered by verify="fast" go to a folder of this run, not the user's cache; tests that
# look at the record itself point SMASH_HASH_CACHE at their own folder.
os.environ.setdefault("SMASH_HASH_CACHE", tempfile.mkdtemp(prefix="smash-test-hashes-"))


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for a module, then restore the count.

    On the shared 2-core machine two OpenMP threads spin against other processes (tiny-sdxl runs
    ~15x slower than with one). Restoring matters: fresh-process comparisons elsewhere run with
    the parent's count, and CPU kernels round differently per thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
