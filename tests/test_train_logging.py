"""Logging and run-directory outputs: W&B modes (offline, disabled, auto), CSV metrics, plots, grids, scores."""

from __future__ import annotations

import csv
import logging
import re
import socket
import time

import pytest
from train_utils import DIGITS, GMM, tiny_gmm, train_in_process

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules.tuned import TunedGrids
from evodiff_pl.training.loggers import RUN_ID_FILE, resolve_wandb_mode


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    """No API key anywhere and no WANDB_MODE: nothing may reach the network."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def _closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_auto_mode_is_online_only_with_a_key_and_a_reachable_server(no_wandb_login, monkeypatch, tmp_path):
    with socket.socket() as server:  # a stand-in W&B server on the loopback interface
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert resolve_wandb_mode("auto") == "offline"
        with pytest.warns(UserWarning, match="no W&B API key is configured"):
            assert resolve_wandb_mode("online") == "offline"
        (tmp_path / "no-netrc").write_text("machine 127.0.0.1 login user password " + "x" * 40 + "\n")
        assert resolve_wandb_mode("auto") == "online"
        (tmp_path / "no-netrc").unlink()
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        assert resolve_wandb_mode("auto") == "online" and resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port_url())  # key, but no server: an offline compute node
    for mode in ("auto", "online"):
        with pytest.warns(UserWarning, match="unreachable from this machine"):
            assert resolve_wandb_mode(mode) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled" and resolve_wandb_mode("offline") == "offline"


def test_key_without_network_runs_offline_instead_of_failing(no_wandb_login, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port_url())
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="unreachable"):
        train_in_process(GMM, tiny_gmm(run_dir, "logger.kind=wandb", "train.total_images=128"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_writes_under_run_dir_and_resume_keeps_the_run(no_wandb_login, tmp_path):
    run_dir = tmp_path / "run"
    wandb = ("logger.kind=wandb", "logger.mode=offline")
    train_in_process(GMM, tiny_gmm(run_dir, *wandb, "train.total_images=192"))
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    train_in_process(GMM, tiny_gmm(run_dir, *wandb))
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # wandb adds "-1" within one second
    assert all(list(r.glob("*.wandb")) for r in runs)


def wandb_records(run_dir, timeout: float = 60.0):
    """The protobuf records of the offline W&B run files under run_dir, once W&B's service process has written
    the run's last record (`exit`): it writes the file asynchronously, also after `wandb.finish()` returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_records(run_dir):
    """The records now in the offline W&B run files (LevelDB log format: 32 KiB blocks of records with a 7-byte
    header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb")):
        data, pos, parts = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            parts += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(parts)
                records.append(record)
                parts = b""
    return records


def test_wandb_plots_everything_against_kimg_with_tags_group_and_tables(no_wandb_login, tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=wandb", "logger.mode=offline", "logger.log_every_steps=4",
                                   "logger.tags=[tiny,cpu]", "logger.group=tests", "train.total_images=768"))
    records = wandb_records(tmp_path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert list(run.tags) == ["tiny", "cpu"] and run.run_group == "tests"
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "train/kimg" for m in metrics)
    rows = [{item.nested_key[0] if item.nested_key else item.key: item.value_json for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    losses = [row for row in rows if "train/loss_per_elem" in row]
    assert [float(row["train/kimg"]) for row in losses] == [0.256, 0.512, 0.768]
    tables = [row for row in rows if "entropic/loss_per_sigma_table" in row]
    assert tables and all("entropic/schedule_table" in row and "train/kimg" in row for row in tables)


def test_wandb_disabled_writes_nothing(no_wandb_login, tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=wandb", "logger.mode=disabled"))
    assert not (tmp_path / "wandb").exists() and not (tmp_path / RUN_ID_FILE).exists()


def test_digits_run_outputs_scores_grids_plots_and_schedule(tmp_path, caplog):
    """The default config, shrunk: the evaluation callback scores evodiff_consistent at NFE 10 and unipc on its
    tuned grid at NFE 5 (RUN/schedule_tuned.json and its plot) and reports its progress; the end of training is
    scored although the config scores every 128k images."""
    overrides = [
        f"run.dir={tmp_path}", "model.net.model_channels=16", "model.net.channel_mult=[1,1]",
        "data.batch_size=64", "train.total_images=384", "logger.kind=csv", "trainer.progress_bar=false",
        "entropic.update_every_steps=3", "entropic.eval_fraction=1", "evaluation.num_samples=64", "evaluation.grid_size=16",
        f"evaluation.stats_dir={tmp_path / 'stats'}", "evaluation.batch_size=32", "evaluation.progress_every_s=0",
    ]
    with caplog.at_level(logging.INFO):
        train_in_process(DIGITS, overrides)
    assert re.search(r"evodiff_consistent_rescaled_entropic_nfe10: 32/64 samples, \d+ img/s, ETA \d+ s", caplog.text)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    names = {k for row in rows for k, v in row.items() if v}
    for spec in ("evodiff_consistent_rescaled_entropic_nfe10", "unipc_tuned_nfe5"):
        assert f"val/fd_pixels_64/{spec}" in names
        assert list((tmp_path / "grids").glob(f"{spec}_384.png"))
    assert {"train/loss_per_elem", "train/lr", "train/images_seen", "train/img_per_s", "val/loss_ema_per_elem"} <= names
    assert (tmp_path / "plots" / "loss_per_sigma.png").is_file() and (tmp_path / "plots" / "schedule.png").is_file()
    schedule = EntropicSchedule.load(tmp_path / "schedule.json")
    assert schedule.kind == "rescaled_entropic" and schedule.sigmas(10, 0.002, 80.0).shape == (11,)
    assert TunedGrids.load(tmp_path / "schedule_tuned.json").get("unipc", 5).shape == (6,)
    assert (tmp_path / "plots" / "schedule_tuned.png").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "model_channels: 16" in (tmp_path / "config.yaml").read_text()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    from evodiff_pl.training.cli import main

    missing = tmp_path / "nowhere"
    assert main(["--config", str(DIGITS), f"run.dir={tmp_path / 'run'}", "data.name=image_folder",
                 f"data.root={missing}", "logger.kind=none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: image folder {missing} does not exist")


def test_progress_bar_counts_steps_to_the_total_from_the_resumed_step(tmp_path, monkeypatch):
    from evodiff_pl.training.loggers import StepProgressBar

    monkeypatch.setattr("evodiff_pl.training.run.is_terminal", lambda: True)

    run_dir = tmp_path / "run"
    train_in_process(GMM, tiny_gmm(run_dir, "train.total_images=192"))  # 3 steps of 64
    result = train_in_process(GMM, tiny_gmm(run_dir, "trainer.progress_bar=true"))  # resumes to 6
    bar = next(c for c in result.trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (3, 6, 6)


def test_the_plain_progress_rate_leaves_out_validation_time(monkeypatch, capsys):
    from types import SimpleNamespace

    from evodiff_pl.training import loggers

    clock = iter([0.0, 10.0, 70.0, 80.0])  # train start; validation 10 s .. 70 s; the line at 80 s
    monkeypatch.setattr(loggers, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    trainer = SimpleNamespace(global_step=0, max_steps=4, is_global_zero=True, progress_bar_metrics={})
    module = SimpleNamespace(images_seen=0, batches_seen=0)
    bar = loggers.PlainProgress(every=2)
    bar.on_train_start(trainer, module)
    bar.on_validation_start(trainer, module)
    bar.on_validation_end(trainer, module)
    trainer.global_step, module.images_seen, module.batches_seen = 2, 400, 2
    bar.on_train_batch_end(trainer, module)
    assert capsys.readouterr().out.strip() == "step 2/4 | 0.4 kimg | 20 img/s | ETA 0m20s"  # 400 images in 20 s


def test_quiet_lightning_drops_the_tips_and_two_warnings_and_keeps_the_rest(caplog):
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from evodiff_pl.training.quiet import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("It is recommended to use `self.log('val/x', ..., sync_dist=True)` when logging on epoch level "
                      "in distributed setting to accumulate the metric across devices.")
        warnings.warn("our own warning")
        with caplog.at_level(logging.INFO):
            rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
            rank_zero_info("step 1/4 | 0.1 kimg")
    assert [str(w.message) for w in caught] == ["our own warning"]
    assert "Tip" not in caplog.text and "step 1/4 | 0.1 kimg" in caplog.text
