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


@pytest.fixture(autouse=True, scope="session")
def _digits_is_the_default_model():
    """The suite's fast model: the embedded digits model (1x16x16) is what ``model=None`` means in every
    test; the colour default (3x32x32) is tested where tests name it (``model="colour"``). Restored at the end."""
    from diffblend.registry import use_default_model

    previous = use_default_model("digits")
    yield
    use_default_model(previous)
