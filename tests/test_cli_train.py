"""`msdali train` end to end: both backends, both modes, bad input, resume, signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from conftest import make_jpeg_folder
from multiscale_dali.training.run import run_training
from multiscale_dali.cli.main import main
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.constants import EXIT_INTERRUPTED

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia") is None, reason="DALI not installed"))]
SMALL = ["--scales", "32,48", "--batch-size", "8", "--workers", "1", "--model", "tiny_cnn"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "images"
    make_jpeg_folder(root, classes=2, per_class=20, sizes=[(64, 48), (48, 64), (56, 56)])
    return root


def _train(*args: str) -> Result:
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return _checkpoint(run_dir)["trainer"]["model"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["multiscale", "progressive"])
def test_train_writes_metrics_config_results_and_model(tmp_path, image_root, backend, mode):
    out = tmp_path / "run"
    by_mode = ["--consistency-weight", "0.5"] if mode == "multiscale" else ["--schedule", "0:32,1:48"]
    result = _train("--data", str(image_root), "--out", str(out), "--backend", backend, "--mode", mode,
                    "--epochs", "2", *by_mode, *SMALL)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert all(x["backend"] == backend and x["mode"] == mode for x in lines)
    expected_train = [["32", "48"], ["32", "48"]] if mode == "multiscale" else [["32"], ["48"]]
    assert [sorted(x["train"]) for x in lines] == expected_train
    assert all(0 <= m["accuracy"] <= 1 for x in lines for m in x["val"].values())
    assert lines[0]["images_per_second"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["backend"] == backend and config["config"]["scales"] == [32, 48]
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == ({"32", "48"} if mode == "progressive" else {"32", "48"})
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["classes"] == ["class_0", "class_1"] and best["task"] == "binary"
    assert "test 48px" in result.output


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--scales", "64,32"], "--scales"),
        (["--scales", "0,64"], "--scales"),
        (["--scales", "a,b"], "--scales"),
        (["--scales", "16.5,32"], "--scales"),
        (["--model", "convnext_tiny", "--scales", "16,24,32"], "--model"),
        (["--model", "resnet9000"], "--model"),
        (["--data", "/no/such/folder"], "--data"),
        (["--consistency-type", "kl"], "--consistency-type"),
        (["--epochs", "0"], "--epochs"),
        (["--schedule", "0:32,2:48"], "--schedule"),
        (["--mode", "progressive", "--consistency-weight", "1"], "--consistency-weight"),
        (["--config", "pipelines/nope.toml"], "--config"),
    ],
)
def test_bad_flag_is_a_one_line_error_naming_it_with_exit_code_2(tmp_path, args, flag):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert flag in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path, image_root):
    out = tmp_path / "run"
    assert _train("--data", str(image_root), "--out", str(out), "--epochs", "1", *SMALL).exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    result = CliRunner().invoke(main, ["train", "--data", str(image_root), "--out", str(out), *SMALL])
    assert result.exit_code == 2 and "--resume auto" in result.output
    assert (out / "metrics.jsonl").read_text() == before, "nothing already written is lost"


def test_bad_image_stops_before_training_unless_skipped(tmp_path):
    root = tmp_path / "images"
    make_jpeg_folder(root, classes=2, per_class=8)
    good = (root / "class_1" / "img_000.jpg").read_bytes()
    (root / "class_1" / "broken.jpg").write_bytes(good[: len(good) // 2])
    failed = CliRunner().invoke(main, ["train", "--data", str(root), "--out", str(tmp_path / "a"), *SMALL])
    assert failed.exit_code == 1 and "broken.jpg" in failed.output
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    skipped = _train("--data", str(root), "--out", str(tmp_path / "b"), "--on-bad-file", "skip",
                     "--epochs", "1", *SMALL)
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads((tmp_path / "b" / "config.json").read_text())["dataset"]["splits"]
    assert sum(s["total"] for s in summary.values()) == 16, "the broken file is not trained on"


# Every piece of the training recipe, each with random draws or state of its own.
RECIPE = ["--auto-augment", "trivial", "--random-erase", "0.5", "--mixup", "0.2", "--cutmix", "1.0",
          "--label-smoothing", "0.1", "--ema-decay", "0.9"]


@pytest.mark.parametrize("backend, mode, recipe", [
    *[pytest.param(*getattr(backend, "values", (backend,)), mode, False, marks=getattr(backend, "marks", ()))
      for backend in BACKENDS for mode in ("multiscale", "progressive")],
    ("torchvision", "multiscale", True),
])
def test_resumed_run_ends_with_bit_identical_weights(tmp_path, image_root, backend, mode, recipe):
    by_mode = ["--consistency-weight", "0.5"] if mode == "multiscale" else ["--schedule", "0:32,2:48"]
    common = ["--data", str(image_root), "--backend", backend, "--mode", mode, "--lr-schedule", "constant",
              *by_mode, *SMALL, *(RECIPE if recipe else [])]
    assert _train(*common, "--epochs", "3", "--out", str(tmp_path / "full")).exit_code == 0
    assert _train(*common, "--epochs", "2", "--out", str(tmp_path / "part")).exit_code == 0
    resumed = _train("--resume", "auto", "--epochs", "3", "--out", str(tmp_path / "part"))
    assert resumed.exit_code == 0, resumed.output
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    if recipe:  # the weight average resumes exactly too, and so does the model kept as best
        full_ema, part_ema = (_checkpoint(tmp_path / run)["trainer"]["ema"] for run in ("full", "part"))
        assert full_ema["step"] == part_ema["step"] > 0
        assert all(torch.equal(full_ema["module"][k], v) for k, v in part_ema["module"].items())
        best = [torch.load(tmp_path / run / "best.pt", weights_only=True)["model"] for run in ("full", "part")]
        assert all(torch.equal(best[0][k], v) for k, v in best[1].items())


CPU_RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "cpu_recipe.toml"


@pytest.mark.parametrize("backend, mode", [("torchvision", "multiscale"),
                                           pytest.param("dali", "progressive", marks=BACKENDS[-1].marks)])
def test_the_cpu_recipe_trains_with_every_option_on(tmp_path, image_root, backend, mode):
    out = tmp_path / "run"
    # Progressive mode trains one scale per step: no consistency term there.
    by_mode = ["--mode", mode]
    if mode == "progressive":
        by_mode += ["--consistency-weight", "0", "--schedule", "0:32,1:48"]
    result = _train("--config", str(CPU_RECIPE), "--data", str(image_root), "--out", str(out), "--backend", backend,
                    "--epochs", "2", *by_mode, *SMALL)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["auto_augment"], config["mixup"], config["cutmix"]) == ("trivial", 0.2, 1.0)
    assert config["label_smoothing"] > 0 and config["random_erase"] > 0 and config["ema_decay"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(set(x["val_ema"]) == set(x["val"]) for x in lines), "the EMA is validated beside the raw weights"
    assert all(0 <= m["accuracy"] <= 1 for x in lines for part in ("train", "val_ema") for m in x[part].values())
    best_epoch = json.loads((out / "results.json").read_text())["best_epoch"]
    kept = torch.load(out / "best.pt", weights_only=True)
    assert kept["val"] == lines[best_epoch]["val_ema"], "best.pt holds the EMA's weights (select_on = ema)"
    assert "val EMA" in result.output


def test_resume_refuses_a_changed_setting_naming_the_flag(tmp_path, image_root):
    out = tmp_path / "run"
    assert _train("--data", str(image_root), "--out", str(out), "--epochs", "1", *SMALL).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--resume", "auto", "--out", str(out), "--scales", "32,64"])
    assert result.exit_code == 2 and "--scales" in result.output
    # The cosine curve is laid out over the epochs: extending it would jump the learning rate back up.
    result = CliRunner().invoke(main, ["train", "--resume", "auto", "--out", str(out), "--epochs", "3"])
    assert result.exit_code == 2 and "--epochs" in result.output and "cosine" in result.output
    # The network's BatchNorm layout is part of what was trained: the run recorded it spelled out.
    assert json.loads((out / "config.json").read_text())["config"]["scale_norm"] == "private"
    result = CliRunner().invoke(main, ["train", "--resume", "auto", "--out", str(out), "--scale-norm", "shared"])
    assert result.exit_code == 2 and "--scale-norm" in result.output and "'private'" in result.output


def test_resume_from_another_runs_checkpoint_never_writes_into_a_used_directory(tmp_path, image_root):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert _train("--data", str(image_root), "--out", str(out), "--epochs", "2", "--lr-schedule", "constant",
                      *SMALL).exit_code == 0
    before = (b / "metrics.jsonl").read_text()
    refused = CliRunner().invoke(main, ["train", "--resume", str(a / "checkpoints" / "previous.pt"),
                                        "--out", str(b)])
    assert refused.exit_code == 2 and "--out" in refused.output
    assert (b / "metrics.jsonl").read_text() == before
    # Into a fresh directory it is a new run continuing from that point; without --out, its own run.
    forked = _train("--resume", str(a / "checkpoints" / "previous.pt"), "--out", str(tmp_path / "c"))
    assert forked.exit_code == 0, forked.output
    assert [json.loads(x)["epoch"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "c" / "best.pt").exists(), "the continued run carries its best model along"
    own = _train("--resume", str(a / "checkpoints" / "last.pt"), "--epochs", "3")
    assert own.exit_code == 0, own.output
    assert [json.loads(x)["epoch"] for x in (a / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_dali_backend_without_dali_names_the_flag_and_the_install(tmp_path, image_root, monkeypatch):
    monkeypatch.setattr("multiscale_dali.pipelines.factory.dali_installed", lambda: False)
    result = CliRunner().invoke(main, ["train", "--data", str(image_root), "--out", str(tmp_path / "r"),
                                       "--backend", "dali", *SMALL])
    assert result.exit_code == 2 and "--backend" in result.output and "nvidia-dali-cuda120" in result.output


@pytest.fixture(scope="module")
def packed_root(image_root, tmp_path_factory) -> Path:
    """``image_root`` packed into shards of a few images each."""
    out = tmp_path_factory.mktemp("packed") / "pack"
    result = CliRunner().invoke(main, ["pack", "--data", str(image_root), "--out", str(out), "--shard-size", "16KB"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("backend, source, accum_steps", [
    ("torchvision", "folder", 1), pytest.param("dali", "folder", 1, marks=BACKENDS[1].marks),
    ("torchvision", "shards", 1), pytest.param("dali", "shards", 1, marks=BACKENDS[1].marks),
    pytest.param("dali", "folder", 2, id="dali-folder-accumulating-2", marks=BACKENDS[1].marks)])
def test_sigterm_mid_epoch_checkpoints_and_resume_matches_uninterrupted_run(tmp_path, request, backend, source,
                                                                           accum_steps):
    """With 2 micro-batches a step, step 3 ends half way through epoch 2 (4 batches an epoch)."""
    data = request.getfixturevalue("image_root" if source == "folder" else "packed_root")
    # torchvision shard workers: their resume is test_loader_resume's (none here, to save their start-up).
    workers = 0 if (backend, source) == ("torchvision", "shards") else 1
    config = TrainConfig(data=str(data), backend=backend, scales=(32, 48), batch_size=8, workers=workers,
                         epochs=2, consistency_weight=0.5, accum_steps=accum_steps)
    run_training(config.replace(out=str(tmp_path / "full")))

    def terminate_at_step_3(event):
        if event.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = run_training(config.replace(out=str(tmp_path / "cut")), on_step=terminate_at_step_3)
    assert stopped.interrupted and stopped.stop_signal == "SIGTERM"
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert state["trainer"]["global_step"] == 3 and state["trainer"]["step_in_epoch"] > 0
    run_training(config.replace(out=str(tmp_path / "cut")), resume="auto")
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, image_root):
    out = tmp_path / "run"
    assert _train("--data", str(image_root), "--out", str(out), "--epochs", "2", "--lr-schedule", "constant",
                  *SMALL).exit_code == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed = _train("--resume", "auto", "--epochs", "3", "--out", str(out))
    assert resumed.exit_code == 0, resumed.output
    lines = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 1, 2], "epoch 1 is retrained from the previous checkpoint, never from scratch"
    assert (out / "metrics.superseded.jsonl").exists()


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"trainer": {"model": {}}, "config": {}, "x": Payload()}, bad)
    result = CliRunner().invoke(main, ["train", "--resume", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "evil.pt" in result.output
    assert not marker.exists()


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_75_with_a_checkpoint(tmp_path, image_root):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "multiscale_dali.cli", "train", "--data", str(image_root), "--out", str(out),
           "--epochs", "200", "--checkpoint-every", "1", "--backend", "torchvision", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "--resume auto" in output
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["trainer"]["global_step"] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_reproduces_weights_and_another_seed_differs(tmp_path, image_root, backend):
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = _train("--data", str(image_root), "--out", str(tmp_path / name), "--backend", backend,
                        "--epochs", "1", "--seed", seed, *SMALL)
        assert result.exit_code == 0, result.output
        runs[name] = _weights(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_on_cuda_keeps_batches_on_the_device(tmp_path, image_root, backend):
    result = _train("--data", str(image_root), "--out", str(tmp_path / "gpu"), "--backend", backend,
                    "--device", "cuda", "--amp", "auto", "--epochs", "2", "--consistency-weight", "0.5", *SMALL)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert config["resolved"]["device"].startswith("cuda")
    assert config["versions"]["gpu"]


@pytest.mark.parametrize("first, then", [("fp16", "off"), ("off", "fp16")])
def test_resume_across_amp_on_and_off(tmp_path, image_root, first, then):
    out = tmp_path / "run"
    common = ["--data", str(image_root), "--lr-schedule", "constant", "--backend", "torchvision", *SMALL]
    assert _train(*common, "--out", str(out), "--epochs", "1", "--amp", first).exit_code == 0
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["trainer"]
    assert ("scaler" in saved) == (first == "fp16"), "the GradScaler is saved only when it is in use"
    resumed = _train("--resume", "auto", "--out", str(out), "--epochs", "2", "--amp", then)
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_relaunch_script_with_config_and_resume_auto_starts_then_continues(tmp_path, image_root):
    recipe = tmp_path / "r.toml"
    recipe.write_text('description = "x"\n[train]\nscales = [32, 48]\nbatch_size = 8\nworkers = 1\n'
                      'lr_schedule = "constant"\nepochs = 1\n')
    out = tmp_path / "run"
    launch = ["--config", str(recipe), "--data", str(image_root), "--out", str(out), "--resume", "auto"]
    assert _train(*launch).exit_code == 0, "first launch: nothing to resume, a fresh run"
    again = _train(*launch, "--epochs", "2")
    assert again.exit_code == 0, again.output
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_resuming_from_a_model_file_points_at_the_training_checkpoint(tmp_path, image_root):
    out = tmp_path / "run"
    assert _train("--data", str(image_root), "--out", str(out), "--epochs", "1", *SMALL).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--resume", str(out / "best.pt")])
    assert result.exit_code == 2 and "last.pt" in result.output and "Traceback" not in result.output


def test_a_conflict_coming_from_the_recipe_says_so(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "pipelines" / "progressive_smoke.toml"
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--mode",
                                       "multiscale", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--schedule" in result.output and "progressive_smoke.toml" in result.output


def test_no_scan_trusts_the_data_and_says_so(tmp_path, image_root):
    result = _train("--data", str(image_root), "--out", str(tmp_path / "r"), "--epochs", "1", "--no-scan", *SMALL)
    assert result.exit_code == 0, result.output
    assert "--no-scan: the files are not checked" in result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["scan"] is False


def test_a_model_too_deep_for_the_smallest_scale_is_refused_before_the_data_is_read(tmp_path):
    # --data does not exist: reading it first would fail on --data instead.
    result = CliRunner().invoke(main, ["train", "--model", "convnext_tiny", "--scales", "16,24,32",
                                       "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: --model: convnext_tiny")
    assert "16 px, 24 px" in message[0] and "32 px" in message[0]
    assert not (tmp_path / "r").exists()


def test_every_scale_of_a_progressive_schedule_is_checked_against_the_model(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "convnext_tiny", "--mode", "progressive", "--scales",
                                       "32,64", "--schedule", "0:16,1:64", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "convnext_tiny cannot run at 16 px" in result.output


def test_a_fractional_scale_in_a_recipe_is_refused_like_one_on_the_command_line(tmp_path):
    recipe = tmp_path / "fractional.toml"
    recipe.write_text('description = "x"\n[train]\nscales = [16.5, 32]\n')
    from_recipe = CliRunner().invoke(main, ["train", "--config", str(recipe), "--out", str(tmp_path / "r")])
    from_flag = CliRunner().invoke(main, ["train", "--scales", "16.5,32", "--out", str(tmp_path / "r")])
    assert from_recipe.exit_code == from_flag.exit_code == 2
    for result in (from_recipe, from_flag):
        assert result.output.startswith("Error: --scales: ") and "16.5" in result.output
    assert "fractional.toml" in from_recipe.output
