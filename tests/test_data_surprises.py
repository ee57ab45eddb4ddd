"""What a dataset or a recipe does that a user would not expect is said, never silently absorbed:
capitalised split folders, schedule steps that never run, fractional scales, skipped GIFs, empty splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_jpeg_folder, synthetic_image
from multiscale_dali.cli.main import main
from multiscale_dali.data.discovery import DataError, discover_dataset
from multiscale_dali.errors import ConfigError
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.run import run_training
from multiscale_dali.training.run_setup import build_schedule, warn_unvisited_scales


def test_capitalised_split_folders_are_the_splits(tmp_path: Path):
    for folder, count in (("Train", 3), ("Val", 1), ("TEST", 1)):
        make_jpeg_folder(tmp_path / folder, classes=2, per_class=count, sizes=[(32, 32)])
    splits = discover_dataset(tmp_path)
    assert splits.explicit_splits and splits.classes == ("class_0", "class_1")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)


def test_two_spellings_of_one_split_are_refused(tmp_path: Path):
    for folder in ("train", "Train"):
        make_jpeg_folder(tmp_path / folder, classes=2, per_class=1, sizes=[(32, 32)])
    with pytest.raises(DataError, match="both"):
        discover_dataset(tmp_path)


def test_two_steps_for_one_epoch_are_an_error_not_a_silent_replacement():
    with pytest.raises(ConfigError, match="two steps") as caught:
        build_schedule(TrainConfig(mode="progressive", schedule="0:32,0:64"))
    assert caught.value.flag == "--schedule"


def test_a_schedule_error_stops_the_command_before_the_data_is_read(tmp_path):
    result = CliRunner().invoke(main, ["train", "--mode", "progressive", "--schedule", "0:32,0:64",
                                       "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--schedule" in result.output, result.output


def test_schedule_steps_after_the_last_epoch_warn(caplog):
    # Not an error: a run with --lr-schedule constant may be resumed with more epochs, and reach them.
    config = TrainConfig(mode="progressive", schedule="0:32,5:64", epochs=3)
    with caplog.at_level(logging.WARNING):
        warn_unvisited_scales(config, build_schedule(config))
    assert "5:64" in caplog.text and "start after the last epoch" in caplog.text


def test_a_short_ramp_that_skips_listed_scales_warns(caplog):
    config = TrainConfig(mode="progressive", scales=(32, 64, 96, 128), epochs=2)
    with caplog.at_level(logging.WARNING):
        warn_unvisited_scales(config, build_schedule(config))
    assert "never trains at 64 px, 96 px" in caplog.text


def test_a_fractional_scale_in_a_recipe_is_an_error_not_a_truncation(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nscales = [16.5, 32]\n")
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--scales" in result.output and "16.5" in result.output, result.output


def test_skipped_gifs_are_counted_in_a_warning(tmp_path, caplog):
    make_jpeg_folder(tmp_path, classes=2, per_class=2, sizes=[(32, 32)])
    for i in range(3):
        Image.fromarray(synthetic_image(32, 32, seed=i)).save(tmp_path / "class_0" / f"anim_{i}.gif")
    with caplog.at_level(logging.WARNING):
        splits = discover_dataset(tmp_path)
    assert sum(len(splits.split(n)) for n in ("train", "val", "test")) == 4
    assert "skipped 3 file(s)" in caplog.text and "3 .gif" in caplog.text


def test_empty_validation_and_test_splits_are_announced(tmp_path, caplog):
    make_jpeg_folder(tmp_path / "images", classes=2, per_class=3, sizes=[(32, 32)])
    config = TrainConfig(data=str(tmp_path / "images"), out=str(tmp_path / "run"), backend="torchvision",
                         scales=(32,), batch_size=4, workers=0, epochs=1, split_fractions=(1.0, 0.0, 0.0), scan=False)
    with caplog.at_level(logging.WARNING):
        run_training(config)
    assert "validation split is empty" in caplog.text and "test split is empty" in caplog.text
