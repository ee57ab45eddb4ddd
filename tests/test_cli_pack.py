"""`msdali pack`, then `train`/`evaluate`/`scan`/`benchmark --data SHARDS`; damaged packs are one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from conftest import make_jpeg_folder
from multiscale_dali.cli.main import main
from multiscale_dali.cli.pack import DEFAULT_SHARD_SIZE
from multiscale_dali.cli.params import BYTE_SIZE
from multiscale_dali.data.shard_format import MANIFEST_FILE, index_text, load_manifest
from multiscale_dali.data.shards import DEFAULT_SHARD_BYTES
from multiscale_dali.pipelines.factory import dali_installed

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI"))]
SMALL = ["--scales", "32,48", "--batch-size", "8", "--model", "tiny_cnn"]


def _workers(backend: str) -> list[str]:
    # No worker processes: their layout and resume are test_loader_resume's and test_shard_loaders'.
    return ["--workers", "0" if backend == "torchvision" else "1"]
SHARD_SIZE = "16KB"  # a few images per tar, so every split spans several shards


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "images"
    make_jpeg_folder(root, classes=2, per_class=20, sizes=[(64, 48), (48, 64), (56, 56)])
    return root


@pytest.fixture(scope="module")
def pack(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "pack"
    result = _cli("pack", "--data", str(image_root), "--out", str(out), "--shard-size", SHARD_SIZE, "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


def _copy(pack: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pack, tmp_path / "pack"))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------- pack
def test_pack_writes_every_split_and_a_manifest_that_records_how(pack, image_root):
    manifest = load_manifest(pack)
    assert [s.samples for s in manifest.splits] == [32, 4, 4]  # 40 images split 0.8/0.1/0.1
    assert len(manifest.split("train").shards) > 1
    assert manifest.source_root == str(image_root) and manifest.seed == 3
    assert manifest.split_fractions == (0.8, 0.1, 0.1)


def test_the_default_shard_size_is_the_packers(tmp_path):
    assert BYTE_SIZE.convert(DEFAULT_SHARD_SIZE, None, None) == DEFAULT_SHARD_BYTES
    assert BYTE_SIZE.convert("16KB", None, None) == 16 * 1024 and BYTE_SIZE.convert("1000", None, None) == 1000
    _one_line_error(_cli("pack", "--data", str(tmp_path), "--out", str(tmp_path / "p"), "--shard-size", "lots"),
                    "--shard-size", "'lots'")


def test_a_killed_pack_is_finished_by_running_it_again(pack, image_root, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"half a tar")  # what a killed pack leaves: no manifest
    (out / ".train-000001.tar.abc123.tmp").write_bytes(b"x")
    result = _cli("pack", "--data", str(image_root), "--out", str(out), "--shard-size", SHARD_SIZE, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert _files(out) == _files(pack)  # the same bytes as an uninterrupted pack


def test_a_different_pack_is_replaced_only_when_asked(pack, image_root, tmp_path):
    out = _copy(pack, tmp_path)
    before = _files(out)
    other_seed = ["pack", "--data", str(image_root), "--out", str(out), "--shard-size", SHARD_SIZE, "--seed", "4"]
    _one_line_error(_cli(*other_seed), "--out", "seed 3 (now 4)", "--overwrite")
    assert _files(out) == before
    assert _cli(*other_seed, "--overwrite").exit_code == 0
    assert load_manifest(out).seed == 4


def test_packing_a_pack_or_into_a_foreign_folder_is_refused(pack, image_root, tmp_path):
    _one_line_error(_cli("pack", "--data", str(pack), "--out", str(tmp_path / "p")), "--data", "already a packed")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(_cli("pack", "--data", str(image_root), "--out", str(tmp_path / "mine")), "--out", "notes.txt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------- using a pack
# torchvision's progressive mode only asks its loader for other scales per epoch (covered on shards
# by test_loader_resume); DALI's takes its sizes from the reader's iteration count, so it runs both.
@pytest.mark.parametrize("backend, mode", [("torchvision", "multiscale"),
                                           *[pytest.param("dali", mode, marks=BACKENDS[1].marks)
                                             for mode in ("multiscale", "progressive")]])
def test_train_on_a_pack_writes_the_run_of_its_splits(pack, tmp_path, backend, mode):
    out = tmp_path / "run"
    by_mode = ["--consistency-weight", "0"] if mode == "multiscale" else ["--schedule", "0:32,1:48"]
    result = _cli("train", "--data", str(pack), "--out", str(out), "--backend", backend, "--mode", mode,
                  "--epochs", "2", *by_mode, *SMALL, *_workers(backend))
    assert result.exit_code == 0, result.output
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["backend"] == backend for e in epochs)
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"]["splits"]["train"]["total"] == 32 and config["dataset"]["packed"]["seed"] == 3
    assert set(json.loads((out / "results.json").read_text())["test"]) == {"32", "48"}


def test_evaluate_on_the_pack_reproduces_the_test_result_of_training(pack, trained, tmp_path):
    out = Path(shutil.copytree(trained[0], tmp_path / "run"))
    result = _cli("evaluate", "--checkpoint", str(out / "best.pt"), "--scales", "48", "--backend", "torchvision",
                  "--recalibrate-bn", "--bn-batches", "1", "--workers", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    tested = json.loads((out / "results.json").read_text())["test"]["48"]["accuracy"]
    row = next(r for r in report["rows"] if r["scale"] == 48 and r["variant"] == "as_trained")
    assert report["data"] == str(pack) and report["num_samples"] == 4
    assert row["accuracy"] == pytest.approx(tested)


def test_split_fractions_other_than_the_packs_are_refused(pack, tmp_path):
    _one_line_error(_cli("train", "--data", str(pack), "--split-fractions", "0.6,0.2,0.2", "--out",
                         str(tmp_path / "run"), *SMALL), "--split-fractions", str(pack))
    assert not (tmp_path / "run").exists()


def test_scan_verifies_an_intact_pack(pack):
    result = _cli("scan", "--data", str(pack))
    assert result.exit_code == 0, result.output
    assert "40 samples verified" in result.output


def test_benchmark_of_a_pack_compares_it_with_the_same_images_as_files(pack, tmp_path):
    result = _cli("benchmark", "--data", str(pack), "--backends", "torchvision", "--workers", "0", "--iters", "1",
                  "--warmup", "0", "--repeats", "1", "--batch-size", "8", "--scales", "32",
                  "--json", str(tmp_path / "b.json"))
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "b.json").read_text())["shards_vs_folder"]
    assert row["backend"] == "torchvision" and row["shards_vs_folder"]["median"] > 0
    assert "shards / folder" in result.output


def test_benchmark_refuses_a_folder_that_does_not_hold_the_packs_images(pack, tmp_path):
    make_jpeg_folder(tmp_path / "other", classes=2, per_class=3)
    _one_line_error(_cli("benchmark", "--data", str(pack), "--compare-folder", str(tmp_path / "other"),
                         "--backends", "torchvision"), "--data", "not the same images")


# ---------------------------------------------------------------------------------------- damaged packs
def _shard(pack: Path, number: int = 0) -> tuple[Path, Path]:
    return pack / f"train-{number:06d}.tar", pack / f"train-{number:06d}.idx"


def _record_shard(pack: Path, tar: Path, *, samples: int | None = None) -> None:
    """Write the shard's new size and checksum (and sample count) into the manifest, as if packed so."""
    manifest = json.loads((pack / MANIFEST_FILE).read_text())
    entry = next(s for s in manifest["splits"]["train"]["shards"] if s["name"] == tar.name)
    entry["bytes"], entry["sha256"] = tar.stat().st_size, hashlib.sha256(tar.read_bytes()).hexdigest()
    if samples is not None:
        entry["samples"] = samples
    (pack / MANIFEST_FILE).write_text(json.dumps(manifest))


def _relabel_first_sample(pack: Path, label: int) -> str:
    """Give the first sample of the first shard another label, in both label members, consistently packed."""
    tar, _ = _shard(pack)
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as archive:
        members = archive.getmembers()[:3]  # <key>.jpg, <key>.cls, <key>.lbl
    assert len(str(label)) == members[1].size
    data[members[1].offset_data : members[1].offset_data + members[1].size] = str(label).encode()
    data[members[2].offset_data : members[2].offset_data + 8] = np.int64(label).astype("<i8").tobytes()
    tar.write_bytes(bytes(data))
    _record_shard(pack, tar)
    return members[0].name.split(".")[0]


def _drop_member(pack: Path, ext: str) -> str:
    """Rewrite the first shard without the first sample's ``ext`` member, with a matching index."""
    tar, index = _shard(pack)
    with tarfile.open(tar) as archive:
        kept = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    key = kept[0][0].name.split(".")[0]
    kept = [(m, d) for m, d in kept if m.name != f"{key}.{ext}"]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in kept:
            archive.addfile(member, fileobj=__import__("io").BytesIO(data))
    with tarfile.open(tar) as archive:
        samples: dict[str, list] = {}
        for m in archive.getmembers():
            samples.setdefault(m.name.split(".")[0], []).append((m.name.split(".", 1)[1], m.offset_data, m.size, m.name))
    index.write_text(index_text(list(samples.values())))
    _record_shard(pack, tar)
    return key


DAMAGE = {
    "truncated": lambda pack: _shard(pack)[0].write_bytes(_shard(pack)[0].read_bytes()[:3000]),
    "missing member": lambda pack: _drop_member(pack, "cls"),
    "count mismatch": lambda pack: _shard(pack)[1].write_text(
        "\n".join([f"v1.2 {int(_shard(pack)[1].read_text().split()[1]) - 1}"]
                  + _shard(pack)[1].read_text().splitlines()[1:-1]) + "\n"),
    "newer msdali": lambda pack: (pack / MANIFEST_FILE).write_text(
        json.dumps({**json.loads((pack / MANIFEST_FILE).read_text()), "format_version": 99,
                    "msdali_version": "99.0"})),
}


@pytest.mark.parametrize("damage, needles", [
    ("truncated", ["train-000000.tar", "ends before member 00000000.cls"]),
    ("missing member", ["train-000000.idx", "00000000"]),
    ("count mismatch", ["train-000000.idx", "lists"]),
    ("newer msdali", ["manifest.json", "newer msdali 99.0"]),
])
def test_scan_names_the_damaged_shard_and_key_in_one_line(pack, tmp_path, damage, needles):
    damaged = _copy(pack, tmp_path)
    DAMAGE[damage](damaged)
    _one_line_error(_cli("scan", "--data", str(damaged)), "--data", *needles)


def test_scan_names_a_shard_whose_bytes_changed_and_a_label_outside_the_classes(pack, tmp_path):
    flipped = _copy(pack, tmp_path / "a")
    tar, _ = _shard(flipped, 1)
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    _one_line_error(_cli("scan", "--data", str(flipped)), "train-000001.tar", "checksum")
    relabelled = _copy(pack, tmp_path / "b")
    key = _relabel_first_sample(relabelled, 7)
    _one_line_error(_cli("scan", "--data", str(relabelled)), "train-000000.tar", key, "label 7, outside 0..1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_label_outside_the_classes_stops_training_naming_shard_and_key(pack, tmp_path, backend):
    damaged = _copy(pack, tmp_path)
    key = _relabel_first_sample(damaged, 7)
    result = _cli("train", "--data", str(damaged), "--out", str(tmp_path / "run"), "--backend", backend,
                  "--epochs", "1", *SMALL, "--workers", "1")  # torchvision: the error crosses from a worker
    _one_line_error(result, "train-000000.tar", key, "outside 0..1")


@pytest.fixture(scope="module")
def trained(pack, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run of one epoch on the pack, and the arguments that made it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    common = ["--backend", "torchvision", "--lr-schedule", "constant", *SMALL, *_workers("torchvision")]
    assert _cli("train", "--data", str(pack), "--out", str(out), "--epochs", "1", *common).exit_code == 0
    return out, common


@pytest.mark.parametrize("damage", ["truncated", "missing member", "count mismatch", "newer msdali"])
def test_a_damaged_pack_stops_a_resumed_run_at_start_and_the_run_directory_is_untouched(
        pack, trained, tmp_path, damage):
    data = _copy(pack, tmp_path)
    out = Path(shutil.copytree(trained[0], tmp_path / "run"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    DAMAGE[damage](data)
    result = _cli("train", "--data", str(data), "--out", str(out), "--epochs", "2", "--resume", "auto", *trained[1])
    _one_line_error(result, str(data))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["trainer"]["epoch"] == 1
