import os

import pytest
import torch

# Mismatched collectives fail at once with a clear message instead of hanging.
os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")

from multirank import World  # noqa: E402


@pytest.fixture(scope="session")
def worlds():
    """worlds(n): a shared n-rank gloo world, started on first use and kept for the session."""
    started: dict[int, World] = {}

    def get(size: int) -> World:
        if size not in started or started[size].closed:
            started[size] = World(size)
        return started[size]

    yield get
    for world in started.values():
        world.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
