"""BatchNorm private to each trained scale: the network picks its branch from the input's size, each
scale's forward moves only its own statistics, copies (a weight EMA) switch on their own, and a run's
configuration says when a model has them (old checkpoints did not)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multiscale_dali.models.registry import build_model
from multiscale_dali.models.scale_norm import (
    ScaleBatchNorm,
    collapse_scale_norm,
    has_private_scale_norm,
    nearest_scale,
    private_scale_norm,
)
from multiscale_dali.errors import ConfigError
from multiscale_dali.training.config import TrainConfig, config_from_checkpoint

SCALES = (16, 24, 32)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return private_scale_norm(build_model("tiny_cnn", num_outputs=3), SCALES)


def _running_means(net: nn.Module, scale: int) -> list[torch.Tensor]:
    return [m.norms[str(scale)].running_mean.clone() for m in net.modules() if isinstance(m, ScaleBatchNorm)]


def test_nearest_scale_is_taken_in_log_ratio_and_ties_go_to_the_larger():
    assert nearest_scale(12, SCALES) == 16
    assert nearest_scale(20, SCALES) == 24  # log(20/16)=0.223 > log(24/20)=0.182
    assert nearest_scale(48, SCALES) == 32
    assert nearest_scale((16 * 24) ** 0.5, (16, 24)) == 24  # the geometric mean: a tie, the larger wins
    with pytest.raises(ValueError, match="must be > 0"):
        nearest_scale(0, SCALES)


def test_every_batchnorm_gets_one_branch_per_scale_starting_from_the_layer_values():
    torch.manual_seed(0)
    plain = build_model("tiny_cnn", num_outputs=3)
    net = private_scale_norm(copy.deepcopy(plain), SCALES)
    plain_norms = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    private = [m for m in net.modules() if isinstance(m, ScaleBatchNorm)]
    assert len(private) == len(plain_norms) > 0
    assert all(sorted(m.norms) == ["16", "24", "32"] for m in private)
    keys = set(net.state_dict())
    assert "features.1.norms.24.running_var" in keys and "features.1.running_var" not in keys


def test_a_train_forward_moves_only_the_statistics_of_the_scale_it_ran_at():
    net = _net().train()
    before = {s: _running_means(net, s) for s in SCALES}
    net(torch.randn(4, 3, 24, 24))
    after = {s: _running_means(net, s) for s in SCALES}
    for scale in (16, 32):
        assert all(torch.equal(a, b) for a, b in zip(before[scale], after[scale]))
    assert not any(torch.equal(a, b) for a, b in zip(before[24], after[24]))


def test_an_untrained_size_uses_the_nearest_branch():
    net = _net().train()
    for scale in SCALES:  # give every branch its own statistics
        net(torch.randn(8, 3, scale, scale) * scale)
    net.eval()
    x = torch.randn(2, 3, 40, 40)
    reference = copy.deepcopy(net)
    collapse_scale_norm(reference, 32)
    torch.testing.assert_close(net(x), reference(x))
    assert not torch.allclose(net(x), collapse_scale_norm(copy.deepcopy(net), 16)(x))


def test_a_deep_copy_switches_its_own_branches():
    net = _net().train()
    ema = copy.deepcopy(net)
    ema(torch.randn(4, 3, 16, 16))
    net(torch.randn(4, 3, 32, 32))
    ema_layer = next(m for m in ema.modules() if isinstance(m, ScaleBatchNorm))
    net_layer = next(m for m in net.modules() if isinstance(m, ScaleBatchNorm))
    assert ema_layer.selector is not net_layer.selector
    assert (ema_layer.selector.current, net_layer.selector.current) == (16, 32)


def test_collapsing_leaves_a_plain_network_of_one_branch():
    net = _net().eval()
    x = torch.randn(2, 3, 24, 24)
    expected = net(x)
    plain = collapse_scale_norm(net, 24)
    assert not has_private_scale_norm(plain)
    assert not plain._forward_pre_hooks
    torch.testing.assert_close(plain(x), expected)
    assert "features.1.running_var" in plain.state_dict()


def test_private_norm_is_the_multiscale_default_and_refused_in_progressive_mode():
    assert TrainConfig(scales=SCALES).private_scale_norm
    assert not TrainConfig(scales=(32,)).private_scale_norm
    assert not TrainConfig(scales=SCALES, mode="progressive").private_scale_norm
    assert not TrainConfig(scales=SCALES, scale_norm="shared").private_scale_norm
    with pytest.raises(ConfigError, match="scale_norm"):
        TrainConfig(scales=SCALES, mode="progressive", scale_norm="private")
    with pytest.raises(ConfigError, match="scale_norm"):
        TrainConfig(scale_norm="per-scale")


def test_a_checkpoint_written_before_the_keys_existed_loads_as_it_trained():
    old = TrainConfig(scales=SCALES).to_dict()
    del old["scale_norm"], old["scale_weighting"]
    config = config_from_checkpoint(old, source="old.pt")
    assert not config.private_scale_norm and config.scale_weighting == "equal"
    new = config_from_checkpoint(TrainConfig(scales=SCALES).to_dict(), source="new.pt")
    assert new.private_scale_norm and new.scale_weighting == "area"


def test_one_scale_at_a_time_under_ddp_is_refused_with_private_norms():
    from types import SimpleNamespace

    from multiscale_dali.training.wrapping import check_wrapping

    ranks = SimpleNamespace(is_distributed=True, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--scale-norm shared"):
        check_wrapping(TrainConfig(scales=SCALES, memory_efficient=True), ranks)
    check_wrapping(TrainConfig(scales=SCALES, memory_efficient=True, scale_norm="shared"), ranks)
    check_wrapping(TrainConfig(scales=SCALES, memory_efficient=True), SimpleNamespace(is_distributed=False,
                                                                                      device=torch.device("cpu")))
