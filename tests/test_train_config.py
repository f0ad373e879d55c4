"""Config schema: shipped configs validate; unknown keys and wrong types stop with the key and a suggestion."""

from __future__ import annotations

import pytest
from train_utils import DIGITS, GMM, ROOT

from evodiff_pl.config.schema import ConfigError, load_config


@pytest.mark.parametrize("name", ["digits", "cifar10", "gmm"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.name == name


def test_default_config_is_digits():
    assert load_config().data.name == "digits"


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("run.seeed=1", "run.seeed", "seed"),
        ("trainerr.devices=2", "trainerr", "trainer"),
        ("optim.learning_rate=1", "optim.learning_rate", None),
        ("model.net.model_chanels=8", "model.net.model_chanels", "model_channels"),
        ("data.resolutoin=8", "data.resolutoin", "resolution"),
        ("evaluation.num_sample=4", "evaluation.num_sample", "num_samples"),
    ],
)
def test_unknown_key_names_key_and_closest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, [override])
    msg = str(err.value)
    assert key in msg
    assert (f"did you mean {suggestion!r}" in msg) if suggestion else "valid keys" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=fast", "optim.lr"),
        ("model.net.num_blocks=two", "model.net.num_blocks"),
        ("model.net.channel_mult=3", "model.net.channel_mult"),
        ("data.batch_size=[1]", "data.batch_size"),
        ("trainer.precision=bf16", "bf16-mixed"),
        ("model.network=unet", "songunet"),
        ("model.precond=vpp", "model.precond='vpp' is not a preconditioning"),
        ("data.name=digit", "digits"),
    ],
)
def test_wrong_type_or_value_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(DIGITS, [override])


@pytest.mark.parametrize("override, message", [
    ("entropic.n_bins=1", r"entropic\.n_bins must be >= 2"),
    ("model.sigma_max=inf", r"model\.sigma_max must be finite and > 0, got inf"),
    ("model.sigma_data=nan", r"model\.sigma_data must be finite and > 0"),
    ("optim.betas=[1.5,0.9]", r"optim\.betas must be 2 values in \[0, 1\)"),
    ("optim.eps=-1", r"optim\.eps must be finite and >= 0"),
    ("run.seed=-1", r"run\.seed must be in \[0, 4294967295\]"),
])
def test_values_that_would_fail_later_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(GMM, [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["dim", "n_components", "num_train"])
def test_an_empty_mixture_or_training_set_is_refused(key):
    from evodiff_pl.data.datasets import DataError, GMMDataModule

    with pytest.raises(DataError, match=f"^{key} must be >= 1, got 0$"):
        GMMDataModule(**{key: 0})


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GMM.read_text().replace("  every_steps: 500", "  every_step: 500"))
    with pytest.raises(ConfigError, match=r"checkpoint\.every_step .*bad\.yaml.*did you mean 'every_steps'"):
        load_config(bad)


def test_data_kwargs_follow_the_dataset():
    with pytest.raises(ConfigError, match=r"data\.dim for DigitsDataModule"):
        load_config(DIGITS, ["data.dim=3"])
    assert load_config(GMM, ["data.dim=3"]).data.dim == 3


def test_main_prints_one_clear_line(capsys, tmp_path):
    from evodiff_pl.training.cli import main

    assert main(["--config", str(GMM), f"run.dir={tmp_path}", "run.seeed=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key run.seeed") and "did you mean 'seed'" in err
    assert not list(tmp_path.iterdir())


def test_network_shape_kwargs_come_from_the_data():
    from evodiff_pl.training.run import network_kwargs

    kw = network_kwargs("songunet", {"model_channels": 16}, (3, 16, 16), 10)
    assert kw == {"model_channels": 16, "img_resolution": 16, "in_channels": 3, "out_channels": 3, "label_dim": 10}
    assert network_kwargs("mlp", {}, (64,), 0) == {"dim": 64, "label_dim": 0}
    with pytest.raises(ConfigError, match="model.net.in_channels=1 does not match the data"):
        network_kwargs("songunet", {"in_channels": 1}, (3, 16, 16), 0)


def test_global_batch_must_divide_over_processes(tmp_path):
    from evodiff_pl.training.run import build

    cfg = load_config(GMM, [f"run.dir={tmp_path}", "logger.kind=none", "evaluation.enabled=false",
                            "trainer.strategy=ddp_spawn", "trainer.devices=3", "data.batch_size=64"])
    with pytest.raises(ConfigError, match="data.batch_size=64 .* not divisible by the 3 processes"):
        build(cfg)


@pytest.mark.parametrize("precond", ["vp", "ve", "iddpm"])
def test_precond_comes_from_the_config_and_is_stored(tmp_path, precond):
    from evodiff_pl.networks.precond import PRECONDS
    from evodiff_pl.training.run import build

    cfg = load_config(GMM, [f"run.dir={tmp_path}", "logger.kind=none", "evaluation.enabled=false",
                            f"model.precond={precond}"])
    module = build(cfg).module
    assert type(module.net) is PRECONDS[precond] and type(module.ema) is PRECONDS[precond]
    assert module.meta["precond"] == {"name": precond, "kwargs": {"sigma_data": 0.5}}
