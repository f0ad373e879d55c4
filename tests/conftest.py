import math
import sys
import types
from pathlib import Path
from unittest import mock

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


@pytest.fixture
def fake_persistence(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class whose instances pickle as NVlabs edm/edm2 persistence records (`Record(class_name, source, **state)`
    -> the same opcodes), for hand-made pickles around arbitrary source and class names."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict) -> None:
        raise AssertionError("never called while pickling")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class Record:
        def __init__(self, class_name: str, source: str = "", **state: object) -> None:
            self.meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)

        def __reduce__(self) -> tuple:
            return (_reconstruct_persistent_obj, (self.meta,))

    return Record


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights (no download), conv weights scaled to keep activations O(1)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = {k: v * math.sqrt(6) if k.endswith("conv.weight") else v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "weights-random.pth"
    torch.save(state, path)
    return path
