"""Weight EMA: warm-up, averaging, buffers, wrappers and an exact resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from multiscale_dali.training.ema import ModelEma, ema_decay, unwrap_model


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()


def _built(seed: int = 0) -> nn.Module:
    model = _model(seed)
    model(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
    return model


def _train_step(model: nn.Module, seed: int) -> None:
    """A stand-in optimiser step: move every parameter, and refresh BatchNorm's running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    model.train()
    model(torch.randn(4, 3, 6, 6, generator=generator))
    model.eval()


def test_decay_warms_up_from_one_tenth_to_the_configured_decay():
    values = [ema_decay(step, decay=0.999) for step in range(9000)]  # reached at 9 / (1 - decay)
    assert values[0] == pytest.approx(0.1) and values[8] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] == 0.999 and max(values) == 0.999
    assert ema_decay(0, decay=0.999, warmup=False) == 0.999


def test_one_update_is_the_lerp_with_the_warm_up_decay():
    model = _built(0)
    ema = ModelEma(model, decay=0.99)
    start = [p.clone() for p in ema.module.parameters()]
    _train_step(model, 1)
    ema.update(model)
    for before, after, raw in zip(start, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(after, 0.1 * before + 0.9 * raw)
    assert ema.step == 1 and ema.current_decay() == pytest.approx(2 / 11)


def test_parameters_converge_to_a_model_that_stops_changing():
    model = _built(0)
    ema = ModelEma(model, decay=0.9, warmup=False)
    _train_step(model, 1)
    assert any(not torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters()))
    for _ in range(300):
        ema.update(model)
    for averaged, raw in zip(ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(averaged, raw, atol=1e-6, rtol=0)


def test_buffers_are_copied_from_the_model_not_averaged():
    model = _built(0)
    ema = ModelEma(model, decay=0.99, warmup=False)
    for step in range(3):
        _train_step(model, step)
        ema.update(model)
        for (name, averaged), raw in zip(ema.module.named_buffers(), model.buffers()):
            assert torch.equal(averaged, raw), name
    assert int(ema.module[1].num_batches_tracked) == 3


def test_ema_buffers_averages_floating_buffers_and_still_copies_integer_ones():
    model = _built(0)
    ema = ModelEma(model, decay=0.5, warmup=False, ema_buffers=True)
    before = ema.module[1].running_mean.clone()
    _train_step(model, 1)
    ema.update(model)
    bn, raw_bn = ema.module[1], model[1]
    torch.testing.assert_close(bn.running_mean, 0.5 * before + 0.5 * raw_bn.running_mean)
    assert not torch.equal(bn.running_mean, raw_bn.running_mean)
    assert torch.equal(bn.num_batches_tracked, raw_bn.num_batches_tracked)


def test_the_average_is_a_separate_frozen_copy():
    model = _built(0)
    ema = ModelEma(model)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))
    assert not ema.module.training


def test_state_round_trip_through_a_weights_only_checkpoint_gives_bit_identical_updates():
    model = _built(0)
    ema = ModelEma(model, decay=0.999)
    for step in range(4):
        _train_step(model, step)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buffer)
    buffer.seek(0)
    resumed = ModelEma(_built(7), decay=0.999)
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["ema"])
    assert resumed.step == 4 and resumed.current_decay() == ema.current_decay()
    for step in range(4, 8):
        _train_step(model, step)
        ema.update(model)
        resumed.update(model)
    want, got = ema.module.state_dict(), resumed.module.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("state", [{}, {"module": {}, "step": -1}, {"module": {}, "step": 1.5}, {"step": 2}])
def test_a_malformed_state_is_refused(state):
    with pytest.raises(ValueError, match="step"):
        ModelEma(_built(0)).load_state_dict(state)


@pytest.mark.parametrize("decay", [-0.1, 1.5, True, "0.99"])
def test_decay_must_be_in_the_unit_interval(decay):
    with pytest.raises(ValueError, match="decay"):
        ModelEma(_built(0), decay=decay)


def test_updating_from_another_architecture_is_refused():
    ema = ModelEma(_built(0))
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))


def test_compiled_models_are_unwrapped_without_compiling():
    model = _built(0)
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    assert unwrap_model(compiled) is model
    ema = ModelEma(compiled, decay=0.5, warmup=False)
    assert set(ema.state_dict()["module"]) == set(model.state_dict())
    _train_step(model, 1)
    ema.update(compiled)
    assert ema.step == 1


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_ddp_wrapped_models_are_unwrapped(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _built(0)
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        ema = ModelEma(wrapped)
        assert set(ema.state_dict()["module"]) == set(model.state_dict())  # no "module." prefix
        ema.update(wrapped)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_updates_on_the_gpu_match_the_cpu():
    cpu_model, gpu_model = _built(0), _built(0).cuda()
    cpu_ema, gpu_ema = ModelEma(cpu_model, decay=0.9), ModelEma(gpu_model, decay=0.9)
    for step in range(3):
        _train_step(cpu_model, step)
        gpu_model.load_state_dict(cpu_model.state_dict())
        cpu_ema.update(cpu_model)
        gpu_ema.update(gpu_model)
    for (name, a), b in zip(cpu_ema.module.state_dict().items(), gpu_ema.module.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, msg=name)
