"""Datamodules: shapes, ranges, quantisation, reproducible order, offline errors; no network access."""

import io
import json
import pickle
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import evodiff_pl.data.datasets as data
from evodiff_pl.data.datasets import DATASETS, DataError, DatasetNotFoundError, build_datamodule
from evodiff_pl.data.stream import DiffusionDataModule, InfiniteSampler
from evodiff_pl.utils.images import to_uint8
from evodiff_pl.utils.seeding import derive_seed
from evodiff_pl.toy import GaussianMixture


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------- to_uint8 and the registry


def test_to_uint8_edm_convention():
    x = torch.tensor([-3.0, -1.0, -0.875, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 16, 128, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    u = torch.arange(256)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1), u.to(torch.uint8))  # uint8 -> [-1, 1] -> uint8 is exact


def test_registry():
    assert set(DATASETS) == {"digits", "cifar10", "image_folder", "gmm"}
    assert all(issubclass(cls, DiffusionDataModule) and cls.name == name for name, cls in DATASETS.items())
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10, digits, gmm, image_folder"):
        build_datamodule("mnist")
    with pytest.raises(TypeError):
        build_datamodule("gmm", hflip=True)


# ---------------------------------------------------------------- held-out split


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


def test_holdout_keeps_a_fixed_split_out_of_training_and_validates_on_it():
    from evodiff_pl.evaluation.classifier import digits_split

    dm = build_datamodule("digits", batch_size=64, holdout=450, seed=5)
    train = torch.stack([dm.data[i][0] for i in range(len(dm.data))])
    held = torch.stack([dm.heldout[i][0] for i in range(len(dm.heldout))])
    assert (len(train), len(held)) == (1347, 450)
    every = build_datamodule("digits").data.tensors[0]
    assert _rows(train) | _rows(held) == _rows(every) and not _rows(train) & _rows(held)
    _, _, x_test, _ = digits_split()
    assert _rows(held) == _rows(x_test)  # the classifier's test split, whatever the run's seed
    assert dm.stats_key() == "digits-8px-holdout450" and _rows(dm.real_images()) <= _rows(to_uint8(train))
    (xb, _), = list(dm.val_dataloader())
    assert torch.equal(xb, held[:64])
    dm.stream_from(0)
    streamed = torch.cat([b[0] for _, b in zip(range(30), dm.train_dataloader())])  # > one epoch of 1,347
    assert _rows(streamed) == _rows(train)
    assert build_datamodule("digits", batch_size=64).val_dataloader().dataset[0][0].equal(every[0])
    with pytest.raises(ValueError, match="holdout=1797 leaves no training data"):
        build_datamodule("digits", holdout=1797).setup()
    with pytest.raises(ValueError, match="holdout must be >= 0"):
        build_datamodule("digits", holdout=-1)


# ---------------------------------------------------------------- digits


def test_digits_defaults():
    dm = build_datamodule("digits", batch_size=64)
    assert (dm.shape, dm.num_classes, dm.is_image, dm.stats_key()) == ((1, 8, 8), 0, True, "digits-8px")
    x, y = dm.data.tensors
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round())  # grey levels 0..16 -> v/16*2-1
    assert y.dtype == torch.int64 and y.unique().tolist() == list(range(10))

    loader = dm.train_dataloader()
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 8, 8) and xb.dtype == torch.float32 and yb.shape == (64,) and yb.dtype == torch.int64
    assert build_datamodule("digits", conditional=True).num_classes == 10


def test_digits_pad_and_resize():
    native = build_datamodule("digits").data.tensors[0]
    pad = build_datamodule("digits", resolution=12)
    xp = pad.data.tensors[0]
    assert pad.shape == (1, 12, 12) and xp.shape == (1797, 1, 12, 12)
    assert torch.equal(xp[..., 2:10, 2:10], native)
    border = torch.ones(12, 12, dtype=torch.bool)
    border[2:10, 2:10] = False
    assert (xp[..., border] == -1).all()
    assert build_datamodule("digits", resolution=11).data.tensors[0].shape[-2:] == (11, 11)  # odd padding

    for res in (16, 4):
        dm = build_datamodule("digits", resolution=res, resize_mode="resize")
        xr = dm.data.tensors[0]
        assert xr.shape == (1797, 1, res, res) and xr.min() >= -1 and xr.max() <= 1
        assert dm.stats_key() == f"digits-{res}px-resize"
    assert pad.stats_key() == "digits-12px-pad"
    with pytest.raises(ValueError, match="too small"):
        build_datamodule("digits", resolution=6)
    with pytest.raises(ValueError, match="resize_mode"):
        build_datamodule("digits", resize_mode="crop")


def test_digits_real_images():
    dm = build_datamodule("digits", resolution=12)
    real = dm.real_images()
    assert real.dtype == torch.uint8 and real.shape == (1797, 1, 12, 12)
    assert torch.equal(real, to_uint8(dm.data.tensors[0]))
    assert real.min() == 0 and real.max() == 255
    first = build_datamodule("digits", resolution=12, hflip=True, seed=5).real_images(max_n=100)
    assert torch.equal(first, real[:100])  # fixed order, never flipped, independent of the seed
    assert torch.equal(dm.real_images(max_n=10**6), real)
    with pytest.raises(ValueError):
        dm.real_images(max_n=0)


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()


def test_loader_order_is_seeded_and_per_epoch():
    def first_batches(seed: int) -> list:
        loader = build_datamodule("digits", batch_size=256, seed=seed).train_dataloader()
        return [b for _, b in zip(range(8), loader)]  # 2048 samples: epoch 0 and the start of epoch 1

    a, b = first_batches(0), first_batches(0)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], first_batches(1)[0][0])
    for e in (0, 1):
        assert sorted(_epoch_permutation(1797, 0, e)) == list(range(1797))  # every epoch is a permutation
    assert _epoch_permutation(1797, 0, 0) != _epoch_permutation(1797, 0, 1)


def test_infinite_sampler_shards_the_global_stream():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    stream = take(InfiniteSampler(10, seed=0), 60)
    for e in range(6):
        assert sorted(stream[10 * e : 10 * e + 10]) == list(range(10))  # concatenated epoch permutations
    assert stream[20:30] == _epoch_permutation(10, 0, 2)
    for r in range(3):
        assert take(InfiniteSampler(10, seed=0, rank=r, world_size=3), 20) == stream[r::3][:20]
        assert take(InfiniteSampler(10, seed=0, rank=r, world_size=3, start=15), 10) == stream[15 + r :: 3][:10]
    with pytest.raises(ValueError):
        InfiniteSampler(10, seed=0, rank=3, world_size=3)


def test_stream_mode_same_global_batches_on_any_world_size_and_resume():
    """Rank r's batch k is [r::W] of the single-process batch k; stream_from(k*B) continues at batch k."""

    def stream(world: int, rank: int, start: int = 0, k: int = 5) -> list:
        dm = build_datamodule("digits", batch_size=12, seed=4, hflip=True)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        dm.stream_from(start)
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(k)]

    single = stream(1, 0, k=320)  # 320 * 12 > 2 * 1797: crosses epoch boundaries of the doubled set
    for world in (2, 3):
        shards = [stream(world, r, k=5) for r in range(world)]
        for k in range(5):
            x, y = single[k]
            assert all(torch.equal(shards[r][k][0], x[r::world]) for r in range(world))
            assert all(torch.equal(shards[r][k][1], y[r::world]) for r in range(world))
    resumed = stream(1, 0, start=300 * 12, k=20)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, single[300:]))
    with pytest.raises(ValueError, match="not divisible"):
        stream(5, 0)
    with pytest.raises(ValueError):
        build_datamodule("digits").stream_from(-1)


def test_hflip_doubles_with_mirrors_and_val_is_one_plain_batch():
    dm = build_datamodule("digits", batch_size=32, hflip=True)
    train = dm.train_dataloader().dataset
    assert len(train) == 2 * 1797
    x0, y0 = train[5]
    x1, y1 = train[1797 + 5]
    assert torch.equal(x1, x0.flip(-1)) and y0 == y1
    val = batches(dm.val_dataloader())
    assert len(val) == 1 and torch.equal(val[0][0], dm.data.tensors[0][:32])
    with pytest.raises(ValueError, match="batch_size"):
        build_datamodule("digits", batch_size=2000).setup()


# ---------------------------------------------------------------- cifar10


def write_fake_cifar(root, per_batch: int = 2) -> torch.Tensor:
    """A `cifar-10-batches-py` folder in the python pickle format; returns its images (N, 3, 32, 32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        images.append(x)
        batch = {"batch_label": f"training batch {i} of 5", "labels": [(i + j) % 10 for j in range(per_batch)],
                 "data": x, "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        meta = {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
        pickle.dump(meta, f)
    return torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)


def test_cifar_missing_offline_raises_clear_error(tmp_path, monkeypatch, no_network):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    dm = build_datamodule("cifar10", root=tmp_path / "nowhere")
    assert dm.shape == (3, 32, 32)
    with pytest.raises(DatasetNotFoundError, match="data.root") as err:
        dm.prepare_data()
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "nowhere") in message and "cifar-10-python.tar.gz" in message
    assert "cifar-10-batches-py" in message and "data.download=false" in message and "URLError" in message

    with pytest.raises(DatasetNotFoundError, match="download disabled"):
        build_datamodule("cifar10", root=tmp_path / "nowhere", download=False).setup()


def test_cifar_fake_local_folder(tmp_path, monkeypatch, no_network):
    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted although the batches are on disk")

    monkeypatch.setattr(data, "download_and_extract_archive", must_not_download)
    images = write_fake_cifar(tmp_path)
    dm = build_datamodule("cifar10", root=tmp_path, batch_size=4, conditional=True)
    assert dm.num_classes == 10 and dm.stats_key() == "cifar10-32px-train"
    real = dm.real_images()
    assert real.dtype == torch.uint8 and torch.equal(real, images)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64
    assert all((to_uint8(xi) == images).flatten(1).all(1).any() for xi in x)


def test_cifar_download_path(tmp_path, monkeypatch, no_network):
    calls = []

    def fake_download(url, download_root, filename, md5):
        calls.append((url, filename))
        write_fake_cifar(tmp_path / "root")

    monkeypatch.setattr(data, "download_and_extract_archive", fake_download)
    monkeypatch.setenv("EVODIFF_DATA", str(tmp_path / "root"))
    dm = build_datamodule("cifar10", batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    from torchvision.datasets import CIFAR10

    assert calls == [(CIFAR10.url, "cifar-10-python.tar.gz")]
    assert len(dm.data) == 10


# ---------------------------------------------------------------- image_folder


def stripes(w: int, h: int) -> Image.Image:
    """Red | green | blue vertical thirds: a centre crop of a 3s x s image is pure green."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3 : 2 * w // 3, 1] = 255
    a[:, 2 * w // 3 :, 2] = 255
    return Image.fromarray(a)


def test_image_folder_loads_and_labels(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog" / "deep").mkdir(parents=True)
    stripes(30, 10).save(tmp_path / "cat" / "a.png")
    stripes(60, 20).save(tmp_path / "dog" / "deep" / "b.PNG")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "dog" / "c.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    dm = build_datamodule("image_folder", root=tmp_path, resolution=8, labels=True, batch_size=2)
    assert (dm.shape, dm.num_classes, dm.classes) == ((3, 8, 8), 2, ["cat", "dog"])
    real = dm.real_images()
    assert real.shape == (3, 3, 8, 8) and real.dtype == torch.uint8
    assert (real[:, 1].int() - 255).abs().max() <= 2 and real[:, [0, 2]].max() <= 2  # centre crop kept the green
    labels = torch.cat([y for _, (_, y) in zip(range(3), dm.train_dataloader())] + [y for _, y in dm.val_dataloader()])
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    assert dm.labels == [0, 1, 1]  # sorted paths: cat/a.png, dog/c.jpg, dog/deep/b.PNG

    grey = build_datamodule("image_folder", root=tmp_path, resolution=4, channels=1, batch_size=2)
    x, y = next(iter(grey.train_dataloader()))
    assert x.shape == (2, 1, 4, 4) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert grey.num_classes == 0 and y.tolist() == [0, 0]
    assert grey.stats_key().startswith(f"image_folder-{tmp_path.name}-") and grey.stats_key().endswith("-n3-4px-1ch")

    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    with pytest.raises(ValueError, match="class subfolder"):
        build_datamodule("image_folder", root=tmp_path, labels=True)


def test_image_folder_missing_or_empty(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DatasetNotFoundError, match=".png") as err:
            build_datamodule("image_folder", root=path)
        assert str(path) in str(err.value)


def write_edm_dataset(dest: Path, labels: list[int] | None, zipped: bool) -> Path:
    """A tiny dataset in the layout of NVlabs edm's dataset_tool.py: grey 8x8 PNGs 00000/img0000000i.png of value
    40 i, and dataset.json {"labels": [[name, label], ...]} or {"labels": null}; a folder or an uncompressed zip.
    Entries and label pairs are written in reverse order (the reader sorts and looks names up)."""
    names = [f"{i:08d}"[:5] + f"/img{i:08d}.png" for i in range(5)]
    files = {}
    for i, name in enumerate(names):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), "L").save(buf, format="png", compress_level=0)
        files[name] = buf.getvalue()
    pairs = None if labels is None else [[n, y] for n, y in zip(names, labels)][::-1]
    files["dataset.json"] = json.dumps({"labels": pairs}).encode()
    if zipped:
        dest = dest.with_suffix(".zip")
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
            for name in reversed(list(files)):
                z.writestr(name, files[name])
    else:
        for name, content in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(content)
    return dest


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_image_folder_reads_edm_dataset_tool_output(tmp_path, zipped):
    root = write_edm_dataset(tmp_path / "labelled", [2, 0, 1, 0, 2], zipped)
    dm = build_datamodule("image_folder", root=root, resolution=8, channels=1, labels=True, batch_size=2)
    assert (dm.shape, dm.num_classes, dm.labels) == ((1, 8, 8), 3, [2, 0, 1, 0, 2])
    real = dm.real_images()
    assert real.shape == (5, 1, 8, 8) and real.flatten(1).float().mean(1).tolist() == [0, 40, 80, 120, 160]
    x, y = next(iter(dm.train_dataloader()))
    value = ((x.flatten(1).mean(1) + 1) * 127.5).round().long()  # back to the PNG value 40 i, label of image i
    assert y.tolist() == [[2, 0, 1, 0, 2][v // 40] for v in value.tolist()]
    dataset = pickle.loads(pickle.dumps(dm.data))  # loader workers get a copy without the open archive
    assert int(dataset[3][0].float().mean()) == 120 and dataset[3][1] == 0

    plain = write_edm_dataset(tmp_path / "plain", None, zipped)
    dm = build_datamodule("image_folder", root=plain, resolution=8, channels=1, batch_size=2)
    assert dm.num_classes == 0 and dm.labels == [0] * 5 and len(dm.real_images()) == 5
    with pytest.raises(DataError, match=r"dataset\.json of .*plain.* stores no labels"):
        build_datamodule("image_folder", root=plain, resolution=8, labels=True, batch_size=2)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not edm's label file"),
    (b'{"label": null}', "is not edm's label file"),
    (b'{"labels": {"00000/img00000000.png": 1}}', "must be a list of \\[file, class\\] pairs"),
    (b'{"labels": [["00000/img00000000.png", 1]]}', "no label for 4 of 5 images, e.g. 00000/img00000001.png"),
    (b'{"labels": [["00000/img0000000%d.png", 0.5]]}', "class indices .*got 0.5"),
    (b'{"labels": [["00000/img0000000%d.png", 4000000000000]]}', "class index 4000000000000 is too large"),
])
def test_a_bad_edm_label_file_is_named(tmp_path, content, message):
    root = write_edm_dataset(tmp_path / "ds", [0] * 5, zipped=False)
    if b"%d" in content:
        value = json.loads(content.replace(b"%d", b"0"))["labels"][0][1]
        content = json.dumps({"labels": [[f"00000/img0000000{i}.png", value] for i in range(5)]}).encode()
    (root / "dataset.json").write_bytes(content)
    with pytest.raises(DataError, match=rf"{root}/dataset\.json.*{message}"):
        build_datamodule("image_folder", root=root, labels=True, batch_size=2)


def test_a_decompression_bomb_is_one_error_naming_the_file(tmp_path, monkeypatch):
    root = write_edm_dataset(tmp_path / "ds", None, zipped=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # the 8x8 PNGs now exceed PIL's bomb limit (2 x 16 pixels)
    dm = build_datamodule("image_folder", root=root, resolution=8, channels=1, batch_size=2)
    with pytest.raises(DataError, match=rf"cannot read image {root}/00000/img00000000\.png: .*decompression bomb"):
        dm.real_images()


def test_a_damaged_zip_is_named(tmp_path):
    (tmp_path / "ds.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match=r"cannot read the zip archive .*ds\.zip"):
        build_datamodule("image_folder", root=tmp_path / "ds.zip", batch_size=2)


# ---------------------------------------------------------------- gmm


def test_gmm_matches_mixture_moments():
    dm = build_datamodule("gmm", batch_size=128)
    mix = dm.mixture
    assert isinstance(mix, GaussianMixture) and (mix.dim, mix.n_components) == (64, 8)
    assert (dm.shape, dm.is_image, dm.num_classes, dm.stats_key()) == ((64,), False, 0, "gmm-d64-k8-s0-n65536")
    x, k = dm.data.tensors
    assert x.shape == (65536, 64) and x.dtype == torch.float32 and k.dtype == torch.int64

    mean = mix.weights @ mix.means
    var = (mix.weights * (mix.variances + (mix.means - mean).square().mean(1))).sum()  # per-dimension variance
    assert (x.double().mean(0) - mean).abs().max() < 0.02
    assert abs(x.double().var(0).mean() / var - 1) < 0.03
    freq = torch.bincount(k, minlength=8).double() / len(k)
    assert (freq - mix.weights).abs().max() < 0.01
    assert torch.allclose(x[k == 0].double().mean(0), mix.means[0], atol=0.02)  # labels are component ids

    real = dm.real_images(1000)
    assert real.dtype == torch.float32 and torch.equal(real, x[:1000])
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (128, 64) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    again = build_datamodule("gmm", dim=64, batch_size=128).real_images(1000)
    assert torch.equal(again, real)
