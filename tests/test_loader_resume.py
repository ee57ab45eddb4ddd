"""Exact resume: a run interrupted at a step boundary and resumed by a new loader from its
``state_dict`` sees bit-identical remaining batches (pixels, labels, order), on both backends and
both sources (a folder's files, a pack's shards).

Every resumed loader is built from scratch and fed a state that went through ``torch.save`` and
``torch.load(weights_only=True)``, as a training checkpoint would; nothing but the state carries over.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_jpeg_folder
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.spec import Loader, LoaderSpec, ShardSource
from multiscale_dali.pipelines.factory import build_loader, dali_installed
from multiscale_dali.pipelines.schedule import ScaleSchedule, constant_schedule, stepwise_schedule
from shard_helpers import pack_one_class_per_image

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI")),
    "torchvision",
]
MULTISCALE = constant_schedule([24, 40])
PROGRESSIVE = stepwise_schedule({0: 24, 1: 32, 2: 40})  # a new size at every epoch boundary
EPOCHS = 3
STEPS = 4  # 10 files in batches of 3: the last batch of every epoch is partial

Position = tuple[int, int]  # (epoch, batches of it consumed)
Record = tuple[int, int, MultiScaleBatch]  # (epoch, step, batch)


SOURCES = ["folder", "shards"]


@pytest.fixture
def files_and_labels(tmp_path: Path) -> tuple[list[str], list[int]]:
    return make_jpeg_folder(tmp_path / "images", classes=2, per_class=5)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ShardSource]:
    root = tmp_path_factory.mktemp("resume-packs")
    # A buffer smaller than the split, so the buffer shuffle (not only the pack's order) is resumed.
    return {count: ShardSource(manifest=pack_one_class_per_image(root / str(count), count), split="train",
                               shuffle_buffer=4) for count in (10, 13)}


@pytest.fixture(params=SOURCES)
def samples(request, tmp_path: Path, packs) -> dict[str, Any]:
    """Ten samples as ``LoaderSpec`` source fields: a folder's files, or the same kind of images packed."""
    if request.param == "shards":
        return {"files": (), "labels": (), "shards": packs[10]}
    return {"files": tuple(make_jpeg_folder(tmp_path / "images", classes=2, per_class=5)[0])}


def _spec(source, schedule: ScaleSchedule, **overrides) -> LoaderSpec:
    """``source``: ``(files, labels)`` or the source fields of the ``samples`` fixture."""
    if not isinstance(source, dict):
        source = {"files": tuple(source[0])}
    if "shards" not in source:
        # one label per file, so labels show the sample order
        source = {**source, "labels": tuple(range(len(source["files"])))}
    args: dict[str, Any] = dict(
        **source,
        schedule=schedule,
        batch_size=3,
        train=True,
        seed=11,
        num_workers=1,
    )
    args.update(overrides)
    return LoaderSpec(**args)


def _loader(backend: str, spec: LoaderSpec) -> Loader:
    # num_workers means DALI threads or DataLoader processes; worker processes only slow tests down.
    if backend == "torchvision":
        spec = dataclasses.replace(spec, num_workers=0)
    return build_loader(spec, backend=backend)


def _uninterrupted(backend: str, spec: LoaderSpec) -> list[Record]:
    loader = _loader(backend, spec)
    try:
        return [(e, s, b) for e in range(EPOCHS) for s, b in enumerate(loader.epoch(e), start=1)]
    finally:
        loader.close()


def _run_until(
    loader: Loader, stop: Position, *, start: Position = (0, 0), hold_last: bool = True
) -> list[Record]:
    """Consume from ``start`` up to ``stop``, leaving the epoch's generator suspended there.

    With ``hold_last=False`` a stop at an epoch's end lets the generator finish instead, as a plain
    ``for batch in loader.epoch(e)`` loop does.
    """
    records: list[Record] = []
    for epoch in range(start[0], stop[0] + 1):
        first = start[1] + 1 if epoch == start[0] else 1
        for step, batch in enumerate(loader.epoch(epoch), start=first):
            records.append((epoch, step, batch))
            if (epoch, step) == stop and (hold_last or step < len(loader)):
                return records
    return records


def _save_and_load(state: dict, path: Path) -> dict:
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == state  # plain data survives the round trip unchanged
    return loaded


def _resume_and_finish(backend: str, spec: LoaderSpec, state: dict, *, ask_finished_epoch: bool) -> list[Record]:
    loader = _loader(backend, spec)
    loader.load_state_dict(state)
    epoch, step = state["epoch"], state["step"]
    records: list[Record] = []
    if step == len(loader):
        if ask_finished_epoch:
            assert list(loader.epoch(epoch)) == []  # nothing of a finished epoch is left
        epoch, step = epoch + 1, 0
    for e in range(epoch, EPOCHS):
        records += [(e, s, b) for s, b in enumerate(loader.epoch(e), start=step + 1 if e == epoch else 1)]
    loader.close()
    return records


def _assert_identical(actual: list[Record], expected: list[Record]) -> None:
    assert [(e, s) for e, s, _ in actual] == [(e, s) for e, s, _ in expected]
    for (epoch, step, got), (_, _, want) in zip(actual, expected):
        where = f"epoch {epoch} step {step}"
        assert got.scales == want.scales, where
        assert torch.equal(got.labels, want.labels), where
        assert all(torch.equal(got.images[s], want.images[s]) for s in want.scales), where
        got_valid, want_valid = getattr(got, "valid", None), getattr(want, "valid", None)  # padding mask
        assert (got_valid is None and want_valid is None) or torch.equal(got_valid, want_valid), where


def _index_after(records: list[Record], position: Position) -> int:
    return next(i for i, (e, s, _) in enumerate(records) if (e, s) == position) + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", [MULTISCALE, PROGRESSIVE], ids=["multiscale", "progressive"])
@pytest.mark.parametrize(
    "stop, hold_last",
    [((1, 2), True), ((0, STEPS), True), ((0, STEPS), False)],
    ids=["mid_epoch", "last_batch_held", "epoch_finished"],
)
def test_resumed_train_loader_yields_the_remaining_batches_bit_for_bit(
    samples, tmp_path, backend, schedule, stop, hold_last
):
    spec = _spec(samples, schedule)
    assert spec.steps_per_epoch == STEPS
    expected = _uninterrupted(backend, spec)
    orders = [torch.cat([b.labels for e, _, b in expected if e == epoch]).tolist() for epoch in range(EPOCHS)]
    assert orders[0] != orders[1] != orders[2]  # so replaying another epoch's shuffle would be caught

    interrupted = _loader(backend, spec)
    consumed = _run_until(interrupted, stop, hold_last=hold_last)
    state = _save_and_load(interrupted.state_dict(), tmp_path / "loader.pt")
    interrupted.close()
    assert (state["epoch"], state["step"]) == stop
    _assert_identical(consumed, expected[: _index_after(expected, stop)])

    resumed = _resume_and_finish(backend, spec, state, ask_finished_epoch=not hold_last)
    _assert_identical(resumed, expected[_index_after(expected, stop) :])


# Run by a child interpreter: nothing of the parent process (DALI's library state, seeds, caches) exists.
_CHILD = """
import pickle, sys, torch
from test_loader_resume import _resume_and_finish
backend, spec_path, state_path, out_path = sys.argv[1:]
with open(spec_path, "rb") as f:
    spec = pickle.load(f)
records = _resume_and_finish(backend, spec, torch.load(state_path, weights_only=True), ask_finished_epoch=False)
torch.save([(e, s, dict(b.images), b.labels, getattr(b, "valid", None)) for e, s, b in records], out_path)
"""


# A torchvision state is only a position (its new-process resume is the folder case's), while a
# DALI state carries DALI's own checkpoint of its reader, so the packed case runs for DALI only.
NEEDS_DALI = pytest.mark.skipif(not dali_installed(), reason="needs DALI")


@pytest.mark.parametrize("backend, source", [pytest.param("dali", "folder", marks=NEEDS_DALI), ("torchvision", "folder"),
                                             pytest.param("dali", "shards", marks=NEEDS_DALI)])
def test_resume_in_a_new_process_matches_the_uninterrupted_run(files_and_labels, packs, tmp_path, backend, source):
    spec = _spec(files_and_labels if source == "folder" else {"files": (), "labels": (), "shards": packs[10]},
                 PROGRESSIVE)
    expected = _uninterrupted(backend, spec)
    interrupted = _loader(backend, spec)
    _run_until(interrupted, (1, 2))
    torch.save(interrupted.state_dict(), tmp_path / "loader.pt")
    interrupted.close()
    with open(tmp_path / "spec.pkl", "wb") as f:
        pickle.dump(spec, f)

    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    args = [backend, tmp_path / "spec.pkl", tmp_path / "loader.pt", tmp_path / "resumed.pt"]
    subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], env=env, check=True, timeout=120)

    resumed = []
    for e, s, images, labels, valid in torch.load(tmp_path / "resumed.pt", weights_only=True):
        batch = MultiScaleBatch(images=images, labels=labels)
        resumed.append((e, s, batch if valid is None else dataclasses.replace(batch, valid=valid)))
    _assert_identical(resumed, expected[_index_after(expected, (1, 2)) :])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_a_resumed_run_can_be_saved_and_resumed_again(tmp_path, backend, source, packs):
    # 13 files over 3 shards pad to 15: 5 samples per shard, some of them padding, in batches of 2
    # with the fifth dropped, so DALI also reads a batch it never hands out. (Packed, the blocks of
    # 4, 4 and 5 samples rotate between the ranks every epoch: rank 2 pads in epoch 1, not in 0.)
    files = make_jpeg_folder(tmp_path / "images", classes=1, per_class=13)
    spec = _spec(files if source == "folder" else {"files": (), "labels": (), "shards": packs[13]}, PROGRESSIVE,
                 num_shards=3, shard_id=2, drop_last=True, batch_size=2)
    assert spec.steps_per_epoch == 2
    expected = _uninterrupted(backend, spec)

    first = _loader(backend, spec)
    _run_until(first, (0, 1))
    state = _save_and_load(first.state_dict(), tmp_path / "first.pt")
    first.close()

    second = _loader(backend, spec)
    second.load_state_dict(state)
    assert second.state_dict() == state  # saving before any batch keeps the loaded position
    records = _run_until(second, (1, 2), start=(0, 1))
    _assert_identical(records, [r for r in expected if (0, 1) < (r[0], r[1]) <= (1, 2)])
    state = _save_and_load(second.state_dict(), tmp_path / "second.pt")
    second.close()

    resumed = _resume_and_finish(backend, spec, state, ask_finished_epoch=False)
    _assert_identical(resumed, expected[_index_after(expected, (1, 2)) :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_eval_loader_yields_the_rest_of_its_epoch(samples, tmp_path, backend):
    spec = _spec(samples, PROGRESSIVE, train=False)
    expected = _uninterrupted(backend, spec)
    interrupted = _loader(backend, spec)
    _run_until(interrupted, (1, 3))
    state = _save_and_load(interrupted.state_dict(), tmp_path / "loader.pt")
    interrupted.close()
    _assert_identical(
        _resume_and_finish(backend, spec, state, ask_finished_epoch=False), expected[_index_after(expected, (1, 3)) :]
    )


def _state_after_one_batch(backend: str, spec: LoaderSpec) -> dict:
    loader = _loader(backend, spec)
    next(iter(loader.epoch(0)))
    state = loader.state_dict()
    loader.close()
    return state


@pytest.mark.skipif(not dali_installed(), reason="needs DALI")
def test_state_from_the_other_backend_is_refused_naming_both(files_and_labels):
    spec = _spec(files_and_labels, MULTISCALE)
    dali_state, torchvision_state = (_state_after_one_batch(b, spec) for b in ("dali", "torchvision"))
    with pytest.raises(ValueError, match="backend 'torchvision', this loader is 'dali'"):
        _loader("dali", spec).load_state_dict(torchvision_state)
    with pytest.raises(ValueError, match="backend 'dali', this loader is 'torchvision'"):
        _loader("torchvision", spec).load_state_dict(dali_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_for_another_batch_size_shard_count_or_position_is_refused_naming_it(files_and_labels, backend):
    state = _state_after_one_batch(backend, _spec(files_and_labels, MULTISCALE))
    with pytest.raises(ValueError, match="batch_size=3, this loader has batch_size=4"):
        _loader(backend, _spec(files_and_labels, MULTISCALE, batch_size=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_shards=1, this loader has num_shards=2"):
        _loader(backend, _spec(files_and_labels, MULTISCALE, num_shards=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="step=9"):
        _loader(backend, _spec(files_and_labels, MULTISCALE)).load_state_dict({**state, "step": 9})


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_before_any_epoch_and_epochs_before_the_resumed_one_are_errors(files_and_labels, backend):
    spec = _spec(files_and_labels, MULTISCALE)
    fresh = _loader(backend, spec)
    with pytest.raises(RuntimeError, match="no epoch"):
        fresh.state_dict()
    list(fresh.epoch(0))
    state = fresh.state_dict()
    fresh.close()
    resumed = _loader(backend, spec)
    resumed.load_state_dict({**state, "epoch": 2})
    with pytest.raises(ValueError, match="resumes at epoch 2"):
        resumed.epoch(1)
    resumed.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_of_one_source_is_refused_by_a_loader_of_another(files_and_labels, packs, backend):
    shards = {"files": (), "labels": (), "shards": packs[10]}
    shard_state = _state_after_one_batch(backend, _spec(shards, MULTISCALE))
    with pytest.raises(ValueError, match="reads a packed directory, this loader reads files"):
        _loader(backend, _spec(files_and_labels, MULTISCALE)).load_state_dict(shard_state)
    other_buffer = {**shards, "shards": dataclasses.replace(packs[10], shuffle_buffer=5)}
    with pytest.raises(ValueError, match="shards="):
        _loader(backend, _spec(other_buffer, MULTISCALE)).load_state_dict(shard_state)


def test_torchvision_shard_workers_resume_mid_epoch_exactly(packs, tmp_path):
    # Two worker processes: each makes every other batch, and a resume skips each one's own share.
    spec = _spec({"files": (), "labels": (), "shards": packs[13]}, MULTISCALE, num_workers=2, batch_size=2,
                 drop_last=True)  # 13 samples: the partial seventh batch is left out
    expected = [(e, s, b) for loader in [build_loader(spec, backend="torchvision")]
                for e in range(2) for s, b in enumerate(loader.epoch(e), start=1)]
    interrupted = build_loader(spec, backend="torchvision")
    _run_until(interrupted, (1, 3))
    state = _save_and_load(interrupted.state_dict(), tmp_path / "loader.pt")
    interrupted.close()
    resumed = build_loader(spec, backend="torchvision")
    resumed.load_state_dict(state)
    records = [(1, s, b) for s, b in enumerate(resumed.epoch(1), start=4)]
    _assert_identical(records, expected[_index_after(expected, (1, 3)):])
