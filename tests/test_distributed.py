"""Several processes, CPU only: gloo, 2 ranks, a few dozen small JPEGs, tiny_cnn.

The end-to-end tests launch real processes, as a user would: ``torchrun --standalone`` where the
launcher's own behaviour matters (SIGTERM forwarding, a rank killed), and the two ranks directly with
torchrun's environment variables where the test must see each rank on its own (its exit code, its log,
its working directory). The loader-level and unit tests run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from conftest import make_jpeg_folder
from multiscale_dali.cli.main import main
from multiscale_dali.data.shard_format import is_packed_dir, load_manifest
from multiscale_dali.training.run import ResumeWorldSizeError, _resume_keeps_loader_states
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.constants import EXIT_INTERRUPTED
from multiscale_dali.data.discovery import discover_dataset
from multiscale_dali.training.distributed import DistributedError, distributed_session
from multiscale_dali.pipelines.spec import LoaderSpec, ShardSource
from multiscale_dali.pipelines.factory import build_loader, dali_installed
from multiscale_dali.training.losses import ScaleConsistencyLoss, base_loss, predict
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.evaluation.model import load_model
from multiscale_dali.models.registry import build_model
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI")),
    "torchvision",
]
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)
SCALES = (32, 48)
WORLD = 2
LAUNCH_TIMEOUT_S = 150  # one launch; a healthy one takes 10-20 s on a busy 2-core machine
TRAIN_EPOCHS = 3
STOP_LINE = re.compile(r"rank (\d)/2 stopped by SIGTERM at epoch (\d+) step (\d+) \(global step (\d+)\)")


# ------------------------------------------------------------------------------------ loader level
def _spec(files: Sequence[str], **overrides) -> LoaderSpec:
    args = dict(files=tuple(files), labels=tuple(range(len(files))),  # label = file index: shows identity
                schedule=constant_schedule([24]), batch_size=2, train=False, seed=3, num_workers=1)
    return LoaderSpec(**(args | overrides))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_shards_with_the_padding_mask_cover_every_sample_exactly_once(tmp_path, backend, train):
    files, _ = make_jpeg_folder(tmp_path / "images", classes=1, per_class=9)  # 9 over 2 shards: 1 pad
    for epoch in (0, 1):  # train reshuffles globally after epoch 0
        real: list[int] = []
        padding: list[int] = []
        steps = []
        for shard in range(WORLD):
            spec = _spec(files, train=train, shard_id=shard, num_shards=WORLD)
            if backend == "torchvision":
                spec = dataclasses.replace(spec, num_workers=0)
            loader = build_loader(spec, backend=backend)
            try:
                for _ in range(epoch):
                    list(loader.epoch(_))
                batches = list(loader.epoch(epoch))
            finally:
                loader.close()
            steps.append(len(batches))
            for batch in batches:
                valid = torch.ones(batch.batch_size, dtype=torch.bool) if batch.valid is None else batch.valid.cpu()
                assert batch.valid is None or not bool(batch.valid.all())  # an all-real batch carries no mask
                real += batch.labels[valid].tolist()
                padding += batch.labels[~valid].tolist()
        assert steps[0] == steps[1] == 3  # ceil(9 / 2) = 5 samples per shard, batches of 2
        assert sorted(real) == list(range(9)), f"epoch {epoch}"
        assert len(padding) == 1 and padding[0] in real  # the pad repeats a real sample


# ------------------------------------------------------------------------------------ unit level
def test_a_single_process_has_no_process_group_and_no_op_helpers(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed_session("cpu") as context:
        assert (context.rank, context.world_size, context.is_main, context.is_distributed) == (0, 1, True, False)
        assert not dist.is_initialized()
        assert context.any_rank(True) and not context.any_rank(False)
        assert context.all_gather_object({"a": 1}) == [{"a": 1}]
        total = torch.tensor([2.0])
        assert context.all_reduce_sum(total) is total and total.item() == 2.0
        context.barrier()
        meter = ScaleMeter()
        assert meter.reduced(context) is meter


def test_an_incomplete_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DistributedError, match="RANK is not set.*torchrun"):
        with distributed_session("cpu"):
            pass


def _payload(world_size: int, step_in_epoch: int) -> dict:
    return {"world_size": world_size, "trainer": {"epoch": 2, "step_in_epoch": step_in_epoch}}


def test_resume_with_another_world_size_only_from_an_epoch_boundary(caplog):
    path = Path("run/checkpoints/last.pt")
    assert _resume_keeps_loader_states(_payload(2, 3), path, 2) is True
    with pytest.raises(ResumeWorldSizeError, match=r"saved by 2 process\(es\).*this run has 4"):
        _resume_keeps_loader_states(_payload(2, 3), path, 4)
    with caplog.at_level(logging.WARNING):
        assert _resume_keeps_loader_states(_payload(2, 0), path, 4) is False
    assert "checkpoint of 2 process(es) with 4" in caplog.text and "starts fresh" in caplog.text
    assert _resume_keeps_loader_states({"trainer": {"epoch": 0, "step_in_epoch": 5}}, path, 1) is True  # old format


def test_padded_samples_are_left_out_of_evaluation_and_training_metrics():
    torch.manual_seed(0)
    net = build_model("tiny_cnn", num_outputs=1)
    trainer = MultiScaleTrainer(net, loss=ScaleConsistencyLoss(task="binary"),
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                schedule=constant_schedule([16]), options=TrainerOptions(epochs=1))
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 1, 0, 1, 1])
    valid = torch.tensor([True, True, True, True, False, False])
    padded = MultiScaleBatch(images={16: images}, labels=labels, valid=valid)
    real = MultiScaleBatch(images={16: images[:4]}, labels=labels[:4])
    expected = trainer.evaluate([real])[16]
    assert trainer.evaluate([padded])[16] == pytest.approx(expected)
    assert expected["accuracy"] in {k / 4 for k in range(5)}
    only_padding = MultiScaleBatch(images={16: images[:2]}, labels=labels[:2], valid=torch.zeros(2, dtype=torch.bool))
    assert trainer.evaluate([padded, only_padding])[16] == pytest.approx(expected)
    meter = ScaleMeter()
    trainer.model.train()
    trainer._step(padded, meter)
    assert meter.count == 4 and float(meter.correct[16]) <= 4


def _step_batches() -> list[MultiScaleBatch]:
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(WORLD):
        labels = torch.randint(0, 2, (4,), generator=generator)
        images = {s: torch.randn(4, 3, s, s, generator=generator) + labels.view(-1, 1, 1, 1) for s in (16, 24)}
        batches.append(MultiScaleBatch(images=images, labels=labels))
    return batches


def _step_trainer(context=None, **options) -> MultiScaleTrainer:
    torch.manual_seed(0)
    net = build_model("tiny_cnn", num_outputs=1)
    return MultiScaleTrainer(
        net, loss=ScaleConsistencyLoss(task="binary", consistency_weight=0.5),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), schedule=constant_schedule([16, 24]),
        options=TrainerOptions(epochs=1, **options), distributed=context)


def _gradients(memory_efficient: bool, batch: MultiScaleBatch, context=None) -> list[torch.Tensor]:
    trainer = _step_trainer(context, memory_efficient=memory_efficient)
    trainer.model.train()
    trainer.optimizer.step = lambda *args, **kwargs: None  # keep the gradients of the step
    trainer._step(batch, ScaleMeter())
    return [p.grad.clone() for p in trainer.net.parameters()]


def _all_reduces_per_step(context, batch: MultiScaleBatch, *, accum_steps: int, memory_efficient: bool) -> int:
    """Gradient buckets DDP all-reduced in one optimiser step of ``accum_steps`` micro-batches of ``batch``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer = _step_trainer(context, accum_steps=accum_steps, memory_efficient=memory_efficient)
    calls = []
    trainer.model.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(state, bucket))
    halves = [MultiScaleBatch(images={s: x[i::accum_steps] for s, x in batch.images.items()},
                              labels=batch.labels[i::accum_steps]) for i in range(accum_steps)]
    trainer.train_epoch(halves, 0)
    assert trainer.global_step == 1
    return len(calls)


def _ddp_gradients_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed_session("cpu") as context:
        batch = _step_batches()[rank]
        result = {mode: _gradients(mode, batch, context) for mode in (False, True)}
        result["all_reduces"] = {f"{k}-{m}": torch.tensor(_all_reduces_per_step(
            context, batch, accum_steps=k, memory_efficient=m)) for k in (1, 2) for m in (False, True)}
        torch.save(result, Path(out) / f"rank{rank}.pt")


@needs_gloo
def test_ddp_gradients_are_the_mean_of_the_ranks_also_one_scale_at_a_time(tmp_path):
    """Two gloo ranks in this machine: plain and memory-efficient (no_sync) steps give every rank the
    average of the two ranks' single-process gradients; an accumulated step all-reduces once."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = mp.start_processes(_ddp_gradients_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("DDP gradient workers did not finish")
    reference = [torch.stack(grads).mean(0) for grads in zip(*(_gradients(False, b) for b in _step_batches()))]
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        all_reduces = {key: int(count) for key, count in result.pop("all_reduces").items()}
        # Two micro-batches all-reduce as often as one batch: the first runs in no_sync.
        assert all_reduces["2-False"] == all_reduces["1-False"] > 0, all_reduces
        assert all_reduces["2-True"] == all_reduces["1-True"] > 0, all_reduces
        for mode, grads in result.items():
            for got, want in zip(grads, reference):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"rank {rank} memory_efficient={mode}")


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """train 32 / val 7 / test 7 JPEGs in 2 classes: odd eval splits, so rank 1 gets one padded sample."""
    root = tmp_path_factory.mktemp("distributed") / "data"
    make_jpeg_folder(root / "train", classes=2, per_class=16)
    for split in ("val", "test"):
        make_jpeg_folder(root / split, classes=2, per_class=4)
        (root / split / "class_1" / "img_003.jpg").unlink()
    return root


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), MSDALI_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train_args(data: Path, out: Path | str, backend: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--backend", backend, "--scales",
            ",".join(map(str, SCALES)), "--epochs", str(TRAIN_EPOCHS), "--batch-size", "4", "--workers",
            "1" if backend == "dali" else "0", "--device", "cpu", "--model", "tiny_cnn", *extra]


def _torchrun(args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "multiscale_dali.cli", *args]
    with log.open("w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def _single(args: list[str], *, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiscale_dali.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {path} appeared:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    result, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            result.append(child)
            todo.append(child)
    return result


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _assert_ranks_in_step(payload: dict) -> None:
    assert payload["world_size"] == WORLD
    assert len(payload["loaders"]) == WORLD and len(payload["rank_steps"]) == WORLD
    positions = {(state["epoch"], state["step"]) for state in payload["loaders"]}
    assert len(positions) == 1, payload["loaders"]  # every rank consumed the same batches
    assert len(set(payload["rank_steps"])) == 1 and payload["rank_steps"][0] == payload["trainer"]["global_step"]
    assert [state["spec"]["shard_id"] for state in payload["loaders"]] == list(range(WORLD))


def _metric_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _single_process_test_metrics(run: Path, data: Path, backend: str) -> dict[int, dict[str, float]]:
    """The test split evaluated by this one process with ``best.pt``: the reference for 2 ranks."""
    # Rebuilt as evaluate does (private BatchNorm per scale, as the run trained it).
    net = load_model(run / "best.pt", device="cpu").model.to(memory_format=torch.channels_last).eval()
    if is_packed_dir(data):
        source = {"files": (), "labels": (), "shards": ShardSource(manifest=load_manifest(data), split="test")}
    else:
        test = discover_dataset(data).test
        source = {"files": test.files, "labels": test.labels}
    spec = LoaderSpec(**source, schedule=constant_schedule(SCALES), batch_size=4,
                      train=False, num_workers=1 if backend == "dali" else 0)
    loader = build_loader(spec, backend=backend)
    logits: dict[int, list[torch.Tensor]] = {s: [] for s in SCALES}
    labels = []
    with torch.no_grad():
        for batch in loader.epoch(0):
            assert batch.valid is None  # one process: nothing is padded
            labels.append(batch.labels)
            for scale in SCALES:
                logits[scale].append(net(batch.images[scale]).float())
    loader.close()
    target = torch.cat(labels)
    assert len(target) == 7
    return {s: {"loss": float(base_loss(torch.cat(logits[s]), target, task="binary")),
                "accuracy": float((predict(torch.cat(logits[s]), task="binary") == target).double().mean())}
            for s in SCALES}


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("backend, mode, source", [
    pytest.param("dali", "progressive", "folder", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI")),
    ("torchvision", "multiscale", "folder"),
    # A pack: each rank reads a block of every split, and the 3 + 4 test samples pad the other way round.
    pytest.param("dali", "multiscale", "shards", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI")),
])
def test_two_ranks_train_in_step_and_evaluate_like_one_process(tmp_path, dataset, backend, mode, source):
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    if source == "shards":
        packed = CliRunner().invoke(main, ["pack", "--data", str(dataset), "--out", str(tmp_path / "pack")])
        assert packed.exit_code == 0, packed.output
        dataset = tmp_path / "pack"
    # Progressive on DALI: the size callback runs ahead of the trainer on every rank's own pipeline.
    extra = ["--mode", "progressive", "--schedule", "0:32,2:48"] if mode == "progressive" else []
    code = _finish(_torchrun(_train_args(dataset, run, backend, *extra), env=_env(tmp_path / "cache"), log=log), log)
    assert code == 0, log.read_text()[-4000:]
    payload = _checkpoint(run)
    _assert_ranks_in_step(payload)
    assert payload["trainer"]["epoch"] == TRAIN_EPOCHS and payload["loaders"][0]["step"] == 4  # 16 per shard / 4
    assert _metric_epochs(run) == list(range(TRAIN_EPOCHS))  # one line per epoch: rank 0 alone appended
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected_scales = [[32], [32], [48]] if mode == "progressive" else [list(SCALES)] * TRAIN_EPOCHS
    assert [line["scales"] for line in lines] == expected_scales
    assert all(sorted(map(int, line["train"])) == line["scales"] for line in lines)
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == WORLD
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["global_batch_size"] == 4 * WORLD
    # 7 test images over 2 ranks: rank 1 evaluates one padded duplicate, which must not count.
    expected = _single_process_test_metrics(run, dataset, backend)
    for scale in SCALES:
        got = results["test"][str(scale)]
        assert got["accuracy"] == pytest.approx(expected[scale]["accuracy"], abs=1e-9)
        assert got["loss"] == pytest.approx(expected[scale]["loss"], rel=1e-4)


def _launch_ranks_directly(args: list[str], *, env: dict[str, str], cwds: Sequence[Path],
                           logs: Sequence[Path]) -> list[subprocess.Popen]:
    """Both ranks with the environment torchrun would give them, each in its own working directory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(WORLD):
        rank_env = env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                          "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cwds[rank].mkdir(parents=True, exist_ok=True)
        with logs[rank].open("w") as handle:
            processes.append(subprocess.Popen([sys.executable, "-m", "multiscale_dali.cli", *args], env=rank_env,
                                              cwd=cwds[rank], stdout=handle, stderr=subprocess.STDOUT))
    return processes


@pytest.mark.slow
@needs_gloo
def test_sigterm_stops_every_rank_at_one_step_with_exit_75_and_resume_finishes(tmp_path, dataset):
    """Each rank is launched by the test, so each exit code and log is its own; rank 1 works in another
    directory and a relative --out, so any file it wrote would show up there."""
    env = _env(tmp_path / "cache")
    cwds, logs = [tmp_path / "rank0", tmp_path / "rank1"], [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    # With the training recipe on: the EMA is saved once, each rank's erase/mix generators per rank.
    args = _train_args(dataset, "run", "torchvision", "--checkpoint-every", "1", "--lr-schedule", "constant",
                       "--mixup", "0.2", "--cutmix", "1.0", "--random-erase", "0.5", "--ema-decay", "0.9")
    ranks = _launch_ranks_directly(args, env=env, cwds=cwds, logs=logs)
    try:
        run = cwds[0] / "run"
        _wait_for(run / "checkpoints" / "last.pt", ranks[0], logs[0])
        for process in ranks:  # what torchrun does with a SIGTERM: forward it to every worker
            process.send_signal(signal.SIGTERM)
        codes = [_finish(process, log) for process, log in zip(ranks, logs)]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [EXIT_INTERRUPTED] * WORLD, texts
    stops = [STOP_LINE.search(text) for text in texts]
    assert all(stops), texts
    assert [int(m.group(1)) for m in stops] == [0, 1]
    assert len({m.groups()[1:] for m in stops}) == 1  # same epoch, step and global step on both ranks
    payload = _checkpoint(run)
    _assert_ranks_in_step(payload)
    assert payload["trainer"]["global_step"] == int(stops[0].group(4)) == payload["trainer"]["ema"]["step"]
    rngs = payload["trainer"]["recipe_rngs"]
    assert len(rngs) == WORLD and not torch.equal(rngs[0]["mixer"], rngs[1]["mixer"]), "each rank draws its own"
    # Only rank 0 writes, and rank 1 logs warnings only.
    assert not (cwds[1] / "run").exists() and sorted(p.name for p in cwds[1].iterdir()) == []
    assert "INFO" in texts[0] and "INFO" not in texts[1]

    log = tmp_path / "resume.log"
    code = _finish(_torchrun(_train_args(dataset, run, "torchvision", "--resume", "auto"), env=env, log=log), log)
    assert code == 0, log.read_text()[-4000:]
    assert _metric_epochs(run) == list(range(TRAIN_EPOCHS)) and (run / "results.json").exists()
    _assert_ranks_in_step(_checkpoint(run))

    # The finished run ends on an epoch boundary: one process may carry it on, with a warning.
    more = _single(_train_args(dataset, run, "torchvision", "--resume", "auto", "--epochs", str(TRAIN_EPOCHS + 1)),
                   env=env)
    assert more.returncode == 0, more.stderr[-4000:]
    assert "checkpoint of 2 process(es) with 1" in more.stderr
    assert _metric_epochs(run) == list(range(TRAIN_EPOCHS + 1))
    assert _checkpoint(run)["world_size"] == 1


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_to_torchrun_checkpoints_every_rank_at_one_step_and_resume_auto_finishes(tmp_path, dataset, backend):
    env, run, log = _env(tmp_path / "cache"), tmp_path / "run", tmp_path / "torchrun.log"
    launcher = _torchrun(_train_args(dataset, run, backend, "--checkpoint-every", "1"), env=env, log=log)
    _wait_for(run / "checkpoints" / "last.pt", launcher, log)
    workers = _descendants(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    # torch elastic reports its own SIGTERM with a SignalException (exit 1); the workers exit 75,
    # which the direct-launch test above sees rank by rank.
    assert _finish(launcher, log) != 0
    text = log.read_text()
    stops = STOP_LINE.findall(text)
    assert sorted(int(s[0]) for s in stops) == [0, 1], text[-4000:]
    assert len({s[1:] for s in stops}) == 1  # both ranks stopped after the same step
    _assert_ranks_in_step(_checkpoint(run))
    assert not [pid for pid in workers if _alive(pid)]

    log = tmp_path / "resume.log"
    code = _finish(_torchrun(_train_args(dataset, run, backend, "--resume", "auto"), env=env, log=log), log)
    assert code == 0, log.read_text()[-4000:]
    assert _metric_epochs(run) == list(range(TRAIN_EPOCHS)) and (run / "results.json").exists()


@pytest.mark.slow
@needs_gloo
def test_a_killed_rank_ends_the_whole_run_promptly_without_orphans(tmp_path, dataset):
    log, run = tmp_path / "torchrun.log", tmp_path / "run"
    backend = "dali" if dali_installed() else "torchvision"
    args = _train_args(dataset, run, backend, "--checkpoint-every", "1", "--epochs", "50")
    launcher = _torchrun(args, env=_env(tmp_path / "cache"), log=log)
    try:
        _wait_for(run / "checkpoints" / "last.pt", launcher, log)
        workers = _children(launcher.pid)
        assert sorted(_rank_of(pid) for pid in workers) == [0, 1]
        everything = _descendants(launcher.pid)
        os.kill(next(pid for pid in workers if _rank_of(pid) == 1), signal.SIGKILL)
        killed_at = time.monotonic()
        code = launcher.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert code != 0
    assert elapsed < 45, f"torchrun took {elapsed:.0f} s to give up after a rank was killed"
    deadline = time.monotonic() + 10
    while [pid for pid in everything if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in everything if _alive(pid)], "processes outlived torchrun"
