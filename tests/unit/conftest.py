"""Unit tests run in-process, beside the other worker's trainers (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Width-32 models gain nothing from threads, and on a shared 2-core box the OpenMP spin-waits
    of a second thread make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
