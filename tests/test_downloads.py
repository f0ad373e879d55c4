"""Network files given as URLs: downloaded once to the cache (a local http.server on 127.0.0.1 serves a fixture
pickle), and an unreachable URL refused in one line that says what to pass instead."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from evodiff_pl.io.checkpointing import CheckpointError
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.training.transfer import read_init

NVLABS = Path(__file__).parent / "data" / "nvlabs"


@pytest.fixture
def server():
    """(base URL of tests/data/nvlabs served on 127.0.0.1, list of the paths requested)."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requested.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(NVLABS)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requested
    httpd.shutdown()
    httpd.server_close()


def test_a_url_is_downloaded_once_and_loads_like_the_file(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EVODIFF_DOWNLOADS", str(tmp_path))
    base, requested = server
    url = f"{base}/songunet_skip_ve_cond.pkl"
    first, again = load_denoiser(url), load_denoiser(url)
    local = load_denoiser(NVLABS / "songunet_skip_ve_cond.pkl")
    assert [p for p in requested if "pkl" in p] == ["/songunet_skip_ve_cond.pkl"]
    assert first.path == again.path and first.path.parent.parent == tmp_path and first.path.suffix == ".pkl"
    for a, b in zip(first.denoiser.state_dict().values(), local.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    raw, _, _ = read_init(url)  # model.init=URL
    assert all(torch.equal(raw[k], v) for k, v in local.denoiser.state_dict().items())


def test_an_unreachable_url_is_one_line_naming_what_to_pass(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EVODIFF_DOWNLOADS", str(tmp_path))
    monkeypatch.setenv("EVODIFF_DOWNLOAD_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once the socket is closed
    for url in (f"http://127.0.0.1:{closed}/edm.pkl", f"{server[0]}/missing.pkl"):
        with pytest.raises(CheckpointError) as err:
            load_denoiser(url)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"cannot download {url}")
        assert "pass its local path instead" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_sample_py_takes_the_url_and_writes_beside_the_working_folder(server, tmp_path, monkeypatch):
    from evodiff_pl.sampling import cli

    monkeypatch.setenv("EVODIFF_DOWNLOADS", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    url = f"{server[0]}/songunet_skip_ve_cond.pkl"
    assert cli.main([f"ckpt={url}", "solver=euler", "schedule=karras", "nfe=2", "seeds=0-1", "format=npz",
                     "device=cpu", "progress=false"]) == 0
    assert (tmp_path / "samples" / "songunet_skip_ve_cond" / "euler_karras_nfe2.npz").is_file()
