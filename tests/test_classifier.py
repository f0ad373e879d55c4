from pathlib import Path

import pytest
import torch

from evodiff_pl.evaluation.classifier import DigitsFeatures, accuracy, digits_split, load_or_train, train_digits_classifier
from evodiff_pl.utils.images import to_uint8
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit

SHIPPED = Path(__file__).parents[1] / "benchmarks" / "results" / "digits_classifier.pt"


def test_shipped_classifier_reproduces_its_held_out_accuracy():
    features, stored = load_or_train(SHIPPED)
    _, _, x_te, y_te = digits_split()
    acc = accuracy(features.net, x_te, y_te)
    assert acc == pytest.approx(stored, abs=1e-6) and acc > 0.97


def test_features_are_128d_float64_and_reject_other_inputs():
    features, _ = load_or_train(SHIPPED)
    x_tr, _, x_te, _ = digits_split()
    f_tr, f_te = features(to_uint8(x_tr)), features(to_uint8(x_te))
    assert f_tr.shape == (len(x_tr), 128) and f_tr.dtype == torch.float64 and features.num_features == 128
    same = frechet_distance(*gaussian_fit(f_tr), *gaussian_fit(f_tr))
    split = frechet_distance(*gaussian_fit(f_tr), *gaussian_fit(f_te))
    assert abs(same) < 1e-6 and split > 0.1
    with pytest.raises(ValueError, match="uint8"):
        features(x_te)


def test_short_training_learns_and_is_saved(tmp_path):
    net, acc = train_digits_classifier(epochs=5)
    assert acc > 0.9
    features, saved_acc = load_or_train(tmp_path / "clf.pt", epochs=5)
    assert saved_acc == pytest.approx(acc) and isinstance(features, DigitsFeatures)
    assert (tmp_path / "clf.pt").is_file()
