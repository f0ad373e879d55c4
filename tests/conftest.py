from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

# The suite is many small tensor ops: one intra-op thread avoids oversubscribing 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    """Official-implementation outputs on the exact mixture (tests/data/README.md)."""
    with np.load(DATA / "gmm_solvers_logsnr_nfe10.npz") as f:
        return dict(f)


@pytest.fixture(scope="session")
def reference_mixture(reference):
    from evodiff_pl.toy import GaussianMixture

    return GaussianMixture(reference["gmm_weights"], reference["gmm_means"], reference["gmm_vars"])


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
