from pathlib import Path

import pytest

from multiscale_dali.training.config import ConfigError, TrainConfig, config_from_mapping, load_recipe, recipe_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "pipelines").glob("*.toml"))


def test_every_shipped_recipe_loads_and_validates():
    assert len(RECIPES) >= 2
    for path in RECIPES:
        _, description = load_recipe(path)
        assert description, f"{path.name} needs a description"
        recipe_config(path)


def test_recipe_values_override_defaults(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('description = "x"\n[train]\nscales = [32, 48]\nepochs = 2\nmode = "progressive"\n')
    config = recipe_config(recipe)
    assert config.scales == (32, 48) and config.epochs == 2 and config.mode == "progressive"
    assert config.batch_size == TrainConfig().batch_size


def test_unknown_recipe_key_is_an_error_naming_key_and_file(tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[train]\nbatchsize = 8\n")
    with pytest.raises(ConfigError, match="typo.toml") as info:
        recipe_config(recipe)
    assert info.value.key == "batchsize"


def test_wrong_type_in_recipe_names_the_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError) as info:
        recipe_config(recipe)
    assert info.value.key == "epochs"


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"scales": (96, 64)}, "scales"),
        ({"scales": (0, 64)}, "scales"),
        ({"epochs": 0}, "epochs"),
        ({"backend": "opencv"}, "backend"),
        ({"consistency_type": "kl"}, "consistency_type"),
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"lr": 0.0}, "lr"),
        ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
        ({"device": "tpu"}, "device"),
        ({"mixup": -1.0}, "mixup"),
        ({"auto_augment": "rand", "rand_m": 31}, "rand_m"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"select_on": "ema"}, "select_on"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"auto_augment": "ta_wide"}, "auto_augment"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(changes, key):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    assert info.value.key == key
    assert info.value.flag == "--" + key.replace("_", "-")


@pytest.mark.parametrize("changes", [{}, {"auto_augment": "rand", "rand_n": 3, "rand_m": 12, "mixup": 0.2,
                                         "cutmix": 1.0, "mix_switch_prob": 0.3, "ema_decay": 0.999,
                                         "select_on": "raw", "random_erase": 0.1, "label_smoothing": 0.1}])
def test_config_round_trips_through_its_plain_dict(changes):
    config = TrainConfig(scales=(32, 64), consistency_weight=0.5, **changes)
    assert config_from_mapping(config.to_dict()) == config


@pytest.mark.parametrize("name", ["cpu_recipe", "resnet50_full_recipe"])
def test_the_training_recipe_recipes_turn_every_piece_on(name):
    config = recipe_config(Path(__file__).resolve().parent.parent / "pipelines" / f"{name}.toml")
    assert config.auto_augment != "none" and config.random_erase > 0 and config.label_smoothing > 0
    assert config.mixup > 0 and config.cutmix > 0 and config.ema_decay > 0
