import logging

import pytest
import torch

from util.dist import shutdown

# bitsandbytes logs an optional-kernel notice at import on CPU; it is noise in test output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker (keywords also hold folder names)
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_global_state():
    """Tests must not leak default dtype/device or process groups into each other."""
    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    yield
    shutdown()
    assert torch.get_default_dtype() == dtype, "a test leaked the default dtype"
    assert torch.get_default_device() == device, "a test leaked the default device"
    torch.set_default_dtype(dtype)
