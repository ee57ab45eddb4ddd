"""Step options: gradient accumulation, the micro-batched memory-efficient step, torch.compile, SyncBatchNorm."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from multiscale_dali.cli.main import main
from multiscale_dali.models.registry import build_model
from multiscale_dali.models.scale_norm import private_scale_norm
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.accumulate import micro_batches
from multiscale_dali.training.compiled import compile_unavailable, dynamo_unavailable
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.losses import ScaleConsistencyLoss
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.training.micro_batch import largest_scale_chunks
from multiscale_dali.training.segments import segment_groups
from multiscale_dali.training.run_setup import build_trainer
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions
from multiscale_dali.training.wrapping import sync_batchnorm

SCALES = (16, 24)


def _no_batchnorm_net() -> nn.Module:
    """Per-sample layers only (GroupNorm, not BatchNorm): a batch's samples never interact."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def _batch(size: int, *, seed: int = 0, scales=SCALES, classes: int = 3) -> MultiScaleBatch:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (size,), generator=gen)
    images = {s: torch.randn(size, 3, s, s, generator=gen) + labels.view(-1, 1, 1, 1) for s in scales}
    return MultiScaleBatch(images=images, labels=labels)


def _split(batch: MultiScaleBatch, parts: int) -> list[MultiScaleBatch]:
    pieces = zip(*(torch.tensor_split(x, parts) for x in batch.images.values()), torch.tensor_split(batch.labels, parts))
    return [MultiScaleBatch(images=dict(zip(batch.images, p[:-1])), labels=p[-1]) for p in pieces]


def _trainer(net: nn.Module, *, scales=SCALES, lr: float = 0.1, **options) -> MultiScaleTrainer:
    options.setdefault("epochs", 1)
    return MultiScaleTrainer(
        net, loss=ScaleConsistencyLoss(task="multiclass", consistency_weight=0.5),
        optimizer=torch.optim.SGD(net.parameters(), lr=lr), schedule=constant_schedule(scales),
        options=TrainerOptions(**options))


def _gradients_of_first_step(trainer: MultiScaleTrainer, batches: list[MultiScaleBatch]) -> list[torch.Tensor]:
    """The gradients the first optimiser step applies (the step itself is left out)."""
    taken: list[list[torch.Tensor]] = []
    trainer.optimizer.step = lambda *a, **k: taken.append([p.grad.clone() for p in trainer.net.parameters()])
    trainer.train_epoch(batches, 0)
    return taken[0]


# ------------------------------------------------------------------------------------ accumulation
def test_micro_batches_close_their_groups_and_never_look_past_a_group_boundary():
    pulled: list[int] = []

    def source(count: int):
        for index in range(count):
            pulled.append(index)
            yield index

    seen = []
    for micro in micro_batches(source(5), accum_steps=2):
        seen.append((micro.batch, micro.index, micro.closes_group, len(pulled)))
    # Inside a group the next batch is fetched before the backward (to know whether the group ends);
    # at a group's end nothing beyond it has been taken from the loader (a checkpoint may be saved there).
    assert seen == [(0, 0, False, 2), (1, 1, True, 2), (2, 0, False, 4), (3, 1, True, 4), (4, 0, True, 5)]
    resumed = [(m.batch, m.index, m.closes_group) for m in micro_batches(iter([4, 5]), accum_steps=2, start=4)]
    assert resumed == [(4, 0, False), (5, 1, True)]
    with pytest.raises(ValueError, match="group boundary"):
        list(micro_batches([0], accum_steps=2, start=1))


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["naive", "memory-efficient"])
def test_accumulating_micro_batches_gives_the_gradients_of_one_batch_k_times_the_size(memory_efficient):
    batch = _batch(8)
    whole = _gradients_of_first_step(_trainer(_no_batchnorm_net(), memory_efficient=memory_efficient), [batch])
    accumulated = _gradients_of_first_step(
        _trainer(_no_batchnorm_net(), accum_steps=4, memory_efficient=memory_efficient), _split(batch, 4))
    for want, got in zip(whole, accumulated):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_shortened_last_group_steps_with_the_mean_of_its_micro_batches():
    first, second, last = _split(_batch(6, seed=3), 3)
    trainer = _trainer(_no_batchnorm_net(), accum_steps=2)
    steps: list[list[torch.Tensor]] = []
    trainer.optimizer.step = lambda *a, **k: steps.append([p.grad.clone() for p in trainer.net.parameters()])
    record = trainer.train_epoch([first, second, last], 0)
    alone = _gradients_of_first_step(_trainer(_no_batchnorm_net()), [last])
    assert len(steps) == 2 and trainer.global_step == 2 and record.train[24]["accuracy"] >= 0
    for want, got in zip(alone, steps[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_learning_rate_schedule_counts_optimizer_steps():
    config = TrainConfig(epochs=2, accum_steps=3, lr=0.1, model="tiny_cnn")
    net = build_model("tiny_cnn", num_outputs=1)
    trainer = build_trainer(config, net, task="binary", schedule=constant_schedule((16,)),
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), steps_per_epoch=7,
                            context=DistributedContext(), num_classes=2)
    events = []
    for epoch in range(2):
        trainer.train_epoch([_batch(2, seed=i, scales=(16,), classes=2) for i in range(7)], epoch,
                            on_step=events.append)
    # 7 batches in groups of 3: steps of 3, 3 and 1 batches per epoch; the cosine ends at the last one.
    assert trainer.global_step == 6 and [e.step for e in events] == [1, 2, 3] * 2
    assert [e.batch_size for e in events[:3]] == [6, 6, 2]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------ micro-batched largest scale
def test_the_largest_scale_is_cut_until_no_chunk_outweighs_the_next_scale():
    def shapes(*sides, batch=8):
        return {s: torch.empty(batch, 3, s, s) for s in sides}

    assert largest_scale_chunks(shapes(64, 96, 128)) == 2  # 16384 / 9216 pixels
    assert largest_scale_chunks(shapes(16, 48, batch=16)) == 9
    assert largest_scale_chunks(shapes(16, 48, batch=4)) == 4  # never more chunks than samples
    assert largest_scale_chunks(shapes(128)) == 1


def _largest_scale_batch_sizes(trainer: MultiScaleTrainer, batch: MultiScaleBatch) -> list[int]:
    sizes: list[int] = []
    first = next(iter(trainer.net.children()))
    hook = first.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]) if args[0].shape[-1] == max(SCALES) else None)
    trainer.train_epoch([batch], 0)
    hook.remove()
    return sizes


def test_memory_efficient_step_micro_batches_the_largest_scale_with_unchanged_gradients():
    batch = _batch(8, seed=1)
    naive = _trainer(_no_batchnorm_net())
    efficient = _trainer(_no_batchnorm_net(), memory_efficient=True)
    # 24 px has 2.25x the pixels of 16 px: three chunks, none larger than the 16 px batch.
    assert _largest_scale_batch_sizes(_trainer(_no_batchnorm_net(), memory_efficient=True), batch) == [3, 3, 2]
    for want, got in zip(_gradients_of_first_step(naive, [batch]), _gradients_of_first_step(efficient, [batch])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_batchnorm_model_is_micro_batched_only_when_asked():
    batch = _batch(8, seed=2, classes=2)

    def net():
        torch.manual_seed(0)
        return build_model("tiny_cnn", num_outputs=3)

    assert _largest_scale_batch_sizes(_trainer(net(), memory_efficient=True), batch) == [8]
    ghost = _trainer(net(), memory_efficient=True, micro_batch_batchnorm=True)
    assert _largest_scale_batch_sizes(ghost, batch) == [3, 3, 2]
    assert all(torch.isfinite(p).all() for p in ghost.net.parameters())


def test_a_batchnorm_model_checkpoints_its_largest_scale_with_the_naive_gradients_and_statistics():
    batch = _batch(8, seed=3)

    def net():
        torch.manual_seed(0)
        # Private BatchNorm per scale (the multi-scale default): every scale's statistics then move
        # the same way whatever order the step runs the scales in, so naive and efficient compare exactly.
        return private_scale_norm(build_model("tiny_cnn", num_outputs=3), SCALES)

    naive, efficient = _trainer(net()), _trainer(net(), memory_efficient=True)
    assert efficient._backward.checkpoint_net is efficient.net and naive._backward.checkpoint_net is None
    for want, got in zip(_gradients_of_first_step(naive, [batch]), _gradients_of_first_step(efficient, [batch])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The recomputation in the backward ran BatchNorm again; its statistics still moved once.
    for want, got in zip(naive.net.buffers(), efficient.net.buffers()):
        torch.testing.assert_close(got, want)


def test_a_sequential_that_starts_in_place_is_checkpointed_after_its_first_group():
    # EfficientNet's classifier is Sequential(Dropout(inplace=True), Linear): checkpointing a group that
    # opens with an in-place module would overwrite the input its recomputation starts from.
    batch = _batch(8, seed=4)

    def net():
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                              nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        return _TrunkAndHead(trunk, head)

    naive, efficient = _trainer(net()), _trainer(net(), memory_efficient=True)
    assert efficient._backward.checkpoint_net is not None
    for want, got in zip(_gradients_of_first_step(naive, [batch]), _gradients_of_first_step(efficient, [batch])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class _TrunkAndHead(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def test_segments_never_start_with_an_in_place_module():
    relu = nn.ReLU(inplace=True)
    children = [nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), relu] * 4
    groups = segment_groups(children)
    assert sum(len(g) for g in groups) == len(children) and len(groups) > 1
    assert all(group[0] is not relu for group in groups)


# ------------------------------------------------------------------------------------ torch.compile
needs_dynamo = pytest.mark.skipif(dynamo_unavailable() is not None, reason="torch.compile is not supported here")


def _compiled_run(backend: str, net: nn.Module, scales=SCALES) -> tuple[MultiScaleTrainer, int, int]:
    """A trainer whose network is compiled with ``backend``: (trainer, graphs after epoch 0, after epoch 1).

    Epoch 1 runs with dynamo's error_on_recompile: any graph compiled after the first epoch fails it.
    """
    from torch._dynamo.utils import counters

    trainer = _trainer(net, scales=scales, lr=0.01, epochs=2, compile_backend=backend)
    data = [_batch(4, seed=i, scales=scales) for i in range(2)] + [_batch(2, seed=9, scales=scales)]
    before = counters["stats"]["unique_graphs"]
    trainer.fit(lambda e: data, lambda e: data[:1], should_stop=lambda: trainer.epoch >= 1)
    after_first = counters["stats"]["unique_graphs"] - before
    with torch._dynamo.config.patch(error_on_recompile=True):
        trainer.fit(lambda e: data, lambda e: data[:1])
    return trainer, after_first, counters["stats"]["unique_graphs"] - before


@needs_dynamo
def test_compiled_training_compiles_in_the_first_epoch_only_and_checkpoints_the_bare_network():
    import torch._dynamo

    torch._dynamo.reset()
    trainer, after_first, after_second = _compiled_run("aot_eager", build_model("tiny_cnn", num_outputs=3))
    # One static graph per input shape: 2 scales x (full batch, the epoch's shorter last batch).
    assert after_first == 4 and after_second == after_first and trainer.epoch == 2
    state = trainer.state_dict()["model"]
    assert state.keys() == build_model("tiny_cnn", num_outputs=3).state_dict().keys()
    assert not any("_orig_mod" in key for key in state)


@needs_dynamo
def test_private_norms_compile_one_graph_per_shape_too():
    import torch._dynamo

    torch._dynamo.reset()
    net = private_scale_norm(build_model("tiny_cnn", num_outputs=3), SCALES)
    trainer, after_first, after_second = _compiled_run("aot_eager", net)
    # The branch follows the input shape, which the graphs are specialised on already: no more graphs.
    assert after_first == 4 and after_second == after_first


@pytest.mark.slow  # inductor generates and compiles C++ kernels: ~30-60 s on a busy 2-core box
@pytest.mark.skipif(compile_unavailable(torch.device("cpu")) is not None or shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler for CPU kernels")
def test_inductor_compiled_training_matches_eager_and_never_recompiles_after_the_first_epoch():
    import torch._dynamo

    torch._dynamo.reset()

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    scales = (8, 12)
    compiled, after_first, after_second = _compiled_run("inductor", net(), scales)
    assert after_second == after_first > 0
    eager = _trainer(net(), scales=scales, lr=0.01, epochs=2)
    data = [_batch(4, seed=i, scales=scales) for i in range(2)] + [_batch(2, seed=9, scales=scales)]
    eager.fit(lambda e: data, lambda e: data[:1])
    torch.testing.assert_close(compiled.net.state_dict(), eager.net.state_dict(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ SyncBatchNorm
def test_sync_batchnorm_keeps_the_parameters_and_the_checkpoint_keys():
    net = build_model("tiny_cnn", num_outputs=1)
    params, keys = list(net.parameters()), list(net.state_dict())
    synced = sync_batchnorm(net)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == keys
    assert all(a is b for a, b in zip(synced.parameters(), params)), "an optimizer built before still trains them"


@pytest.mark.parametrize("args, flag, words", [
    (["--sync-bn"], "--sync-bn", "needs CUDA devices under torchrun"),
    (["--accum-steps", "0"], "--accum-steps", ">= 1"),
    (["--micro-batch-batchnorm"], "--micro-batch-batchnorm", "--memory-efficient"),
])
def test_step_options_that_cannot_work_stop_before_any_data_is_read(tmp_path, args, flag, words):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "none"), *args])
    assert result.exit_code == 2, result.output
    assert flag in result.output and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_a_step_mid_accumulation_is_not_a_checkpoint():
    trainer = _trainer(_no_batchnorm_net(), accum_steps=2)
    first = next(micro_batches([_batch(2), _batch(2)], accum_steps=2))
    assert trainer._step(first.batch, ScaleMeter(), first) is None
    with pytest.raises(RuntimeError, match="between optimiser steps"):
        trainer.state_dict()
