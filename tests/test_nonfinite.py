"""Non-finite numbers: refused as settings, never kept as the best model, never written as bare NaN."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_jpeg_folder
from multiscale_dali.errors import ConfigError
from multiscale_dali.fileio import dumps_json
from multiscale_dali.training.best import BestEpoch, all_finite
from multiscale_dali.training.config import TrainConfig, config_from_mapping
from multiscale_dali.training.run import run_training
from multiscale_dali.training.trainer import NonFiniteLossError

FLOAT_FIELDS = [f.name for f in fields(TrainConfig) if isinstance(f.default, float)]


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_setting_refuses_non_finite_values_naming_its_flag(key, value):
    with pytest.raises(ConfigError, match="finite") as caught:
        TrainConfig(**{key: value})
    assert caught.value.flag == "--" + key.replace("_", "-")


def test_a_recipe_inf_is_refused_like_a_flag():
    with pytest.raises(ConfigError, match="finite"):
        config_from_mapping({"weight_decay": float("inf")}, source="r.toml")


@pytest.mark.parametrize("changes, key", [({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"),
                                          ({"momentum": 1.0}, "momentum"), ({"workers": 10**6}, "workers"),
                                          ({"scales": (32, 10**5)}, "scales")])
def test_out_of_range_settings_name_their_flag(changes, key):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**changes)
    assert caught.value.key == key


def test_a_non_finite_validation_never_becomes_the_best_epoch():
    best, net = BestEpoch(), nn.Linear(2, 2)
    assert not best.offer(0, {"accuracy": 0.9, "loss": math.nan}, net)
    assert not best.offer(1, {"accuracy": math.nan, "loss": 0.1}, net)
    assert best.epoch is None and best.weights is None
    assert best.offer(2, {"accuracy": 0.1, "loss": 2.0}, net)
    assert not best.offer(3, {"accuracy": 1.0, "loss": math.inf}, net)
    assert best.epoch == 2


def test_all_finite_spots_a_nan_weight():
    net = nn.Linear(2, 2)
    assert all_finite(net)
    with torch.no_grad():
        net.weight[0, 0] = math.nan
    assert not all_finite(net)


def test_json_writes_null_for_non_finite_numbers():
    text = dumps_json({"loss": math.nan, "test": {"32": [math.inf, 1.5, -math.inf]}, "n": 3})
    assert _strict_json(text) == {"loss": None, "test": {"32": [None, 1.5, None]}, "n": 3}


def test_a_diverged_run_keeps_no_nan_model_and_writes_valid_json(tmp_path: Path):
    root = tmp_path / "images"
    make_jpeg_folder(root, classes=2, per_class=6, sizes=[(40, 40)])
    out = tmp_path / "run"
    # Finite, yet the first step overflows every weight to inf/NaN.
    config = TrainConfig(data=str(root), out=str(out), backend="torchvision", scales=(32,), batch_size=4,
                         workers=0, epochs=1, lr=1e308, scan=False)
    with pytest.raises(NonFiniteLossError, match="diverged|non-finite"):
        run_training(config)
    assert not (out / "best.pt").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = _strict_json(line)
        assert not record["is_best"]
