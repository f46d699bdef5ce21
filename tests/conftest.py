import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# under pytest-xdist (scripts/test.sh runs one worker per core) each worker and the CLI processes it
# starts use their share of the cores: two workers with all cores each slow each other several-fold
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 (float32, cached after the first dequantisation)."""
    from megedit import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


def pytest_collection_modifyitems(items):
    """The slow (SmolLM2) tests first: under pytest-xdist they then start at once and no long test
    is left to run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
