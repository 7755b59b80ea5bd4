import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test draws its own random inputs, reproducibly: the seed is derived from its id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
