"""train.py's command line and what a user sees: the key listing, --print-config, one-line errors, the plain
progress line of non-terminal runs, download timeouts."""

from __future__ import annotations

import re
import socket
import time

import pytest
from train_utils import DIGITS, GMM, tiny_gmm, train_in_process

from evodiff_pl.config.schema import Config
from evodiff_pl.config.keys import key_docs
from evodiff_pl.training.cli import main


def test_help_lists_every_key_with_its_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    rows = key_docs(Config)
    assert len(rows) > 40
    for key, default, doc in rows:
        assert f"  {key}={default}\n      {doc}\n" in out + "\n", key
    assert "  optim.lr=0.001\n      Adam learning rate after warm-up." in out
    for key in ("perf.compile=false", "data.pin_memory=false", "data.download=true", "evaluation.num_samples=2000",
                "model.net.model_channels=128", "logger.tags=[]"):
        assert f"  {key}\n" in out, key
    assert re.findall(r"^  ([\w.]+=[^\n]*)\n *\n", out, flags=re.M) == []  # every key with its documentation


def test_print_config_prints_the_resolved_config_and_exits(capsys, tmp_path):
    assert main(["--config", str(GMM), f"run.dir={tmp_path / 'run'}", "optim.lr=2e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.0002\n" in out and "name: gmm" in out and "perf:\n" in out
    assert not (tmp_path / "run").exists()


def test_shipped_configs_are_found_by_name_from_any_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "configs/cifar10.yaml", "--print-config"]) == 0
    assert "name: cifar10" in capsys.readouterr().out
    assert main(["--config", "configs/nope.yaml"]) == 1
    assert capsys.readouterr().err.startswith("error: config file configs/nope.yaml does not exist (shipped configs: ")


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.feature=inception", "evaluation.weights_path={tmp}/weights.pth"],
     "Inception weights file {tmp}/weights.pth does not exist; on an offline node download https://github.com/"
     "toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth elsewhere and pass its"
     " path (train.py: evaluation.weights_path=/path/weights-inception-2015-12-05-6726825d.pth"),
    (["data.num_workers=-1"], "data: num_workers must be >= 0"),
    (["logger.tags=cifar"], "invalid value for logger.tags in the command line"),
    (["perf.sync_free_step=true", "trainer.precision=16-mixed"], "perf.sync_free_step does not work with"),
])
def test_user_errors_are_one_line(overrides, message, tmp_path, capsys):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    assert main(["--config", str(DIGITS), f"run.dir={tmp_path / 'run'}", "logger.kind=none", *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1


def test_non_terminal_run_prints_a_plain_progress_line(tmp_path, capsys):
    """pytest's stderr is not a terminal: one line every logger.log_every_steps steps, and at the end."""
    train_in_process(GMM, tiny_gmm(tmp_path, "trainer.progress_bar=true", "logger.log_every_steps=2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    pattern = r"step (\d)/6 \| ([\d.]+) kimg \| \d+ img/s \| loss [\d.e+-]+ \| ETA \d+m\d\ds"
    assert [re.fullmatch(pattern, line).groups() for line in lines] == [("2", "0.1"), ("4", "0.3"), ("6", "0.4")]


def test_download_without_an_answer_times_out_with_the_offline_advice(monkeypatch, tmp_path):
    """A server that accepts the connection and never answers (a firewall that drops packets hangs the same way)."""
    from torchvision.datasets import CIFAR10

    from evodiff_pl.data.datasets import CIFAR10DataModule, DatasetNotFoundError

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-python.tar.gz")
        monkeypatch.setenv("EVODIFF_DOWNLOAD_TIMEOUT", "0.5")
        start = time.perf_counter()
        with pytest.raises(DatasetNotFoundError, match=r"0.5 s timeout.*data.download=false"):
            CIFAR10DataModule(root=tmp_path).prepare_data()
        assert time.perf_counter() - start < 10
