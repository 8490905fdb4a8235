"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One intra-op thread for the whole suite: every model here is tiny, so thread start-up dominates
    and extra OpenMP threads only spin (measured on a 2-core machine: 25 tiny training steps took 13 s
    with 2 threads and 1 s with 1; tests/test_train.py 151 s vs 40 s). Restored at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
