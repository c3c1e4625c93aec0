import pytest
import torch

# Run with TORCH_DISTRIBUTED_DEBUG=DETAIL to have mismatched collectives fail at once with a
# clear message instead of hanging until a World's timeout names the ranks: torch then checks
# every collective with one more, which costs the suite about a fifth of its time.

from multirank import World, settle


@pytest.fixture(scope="session")
def worlds():
    """worlds(n): a shared n-rank gloo world, started on first use and kept for the session."""
    started: dict[int, World] = {}

    def get(size: int) -> World:
        if size not in started or started[size].closed:
            started[size] = World(size)
        return started[size]

    yield get
    for world in started.values():  # the session is over: no rank has anything left to do or say
        world.close(force=True)  # (a clean exit of each world's ranks took ~9 s of the suite)


@pytest.fixture(autouse=True)
def _settle_after_each_test():
    """The one-rank runs in this process collect as the world's ranks do: see settle()."""
    yield
    settle()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
