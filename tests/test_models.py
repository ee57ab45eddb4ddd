from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from multiscale_dali.models import input_size
from multiscale_dali.models.input_size import check_model_scales, smallest_scale
from multiscale_dali.models.registry import (
    TINY_CNN,
    ModelError,
    TinyCNN,
    build_model,
    describe_models,
    list_available_models,
    pretrained_weights_path,
)

TORCHVISION_MODELS = (
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
SMOKE_INPUT = (2, 3, 64, 64)
# The product's model should be cheap to train on CPU: the brief's budget is ~50-150k parameters.
TINY_PARAM_RANGE = (50_000, 150_000)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Point torch.hub at an empty cache so no test can see (or fetch) real weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    return tmp_path


def test_registry_lists_our_model_and_the_torchvision_classifiers_sorted():
    names = list_available_models()
    assert names == sorted(names)
    assert set(names) == {TINY_CNN, *TORCHVISION_MODELS}


@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("name", list_available_models())
def test_every_model_maps_an_image_batch_to_one_row_of_logits_per_image(name, num_outputs):
    torch.manual_seed(0)
    model = build_model(name, num_outputs=num_outputs).eval()
    with torch.no_grad():
        logits = model(torch.randn(*SMOKE_INPUT))
    assert logits.shape == (SMOKE_INPUT[0], num_outputs)
    assert torch.isfinite(logits).all()


def test_tiny_cnn_is_small_and_runs_at_every_training_resolution():
    model = build_model(TINY_CNN, num_outputs=4)
    params = sum(p.numel() for p in model.parameters())
    assert TINY_PARAM_RANGE[0] <= params <= TINY_PARAM_RANGE[1]
    for side in (64, 96, 128, 100):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 4)


def test_tiny_cnn_learns_a_trivial_task_in_a_few_steps():
    # Bright vs dark images: a model that cannot fit this is broken, whatever its architecture.
    torch.manual_seed(0)
    model = build_model(TINY_CNN, num_outputs=2)
    images = torch.cat([torch.full((8, 3, 32, 32), 1.0), torch.full((8, 3, 32, 32), -1.0)])
    images += 0.1 * torch.randn_like(images)
    labels = torch.cat([torch.ones(8), torch.zeros(8)]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_tiny_cnn_accepts_channels_last_input():
    model = build_model(TINY_CNN, num_outputs=3).eval()
    x = torch.randn(*SMOKE_INPUT)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.to(memory_format=torch.channels_last)), atol=1e-5)


def test_unknown_model_error_lists_the_available_names():
    with pytest.raises(ModelError, match="'resnet9000'") as info:
        build_model("resnet9000", num_outputs=2)
    assert all(name in str(info.value) for name in list_available_models())
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_head_width_must_be_a_positive_int(bad):
    with pytest.raises(ModelError, match=repr(bad)):
        build_model(TINY_CNN, num_outputs=bad)


def test_tiny_cnn_has_no_pretrained_weights():
    with pytest.raises(ModelError, match=TINY_CNN):
        build_model(TINY_CNN, num_outputs=2, pretrained=True)


def test_pretrained_weights_live_in_the_hub_checkpoint_dir(empty_hub):
    path = pretrained_weights_path("resnet18")
    assert os.path.dirname(path) == os.path.join(str(empty_hub), "hub", "checkpoints")
    assert path.endswith(".pth")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_pretrained_without_cached_weights_fails_naming_the_expected_path(empty_hub, name):
    expected = pretrained_weights_path(name)
    with pytest.raises(ModelError) as info:
        build_model(name, num_outputs=2, pretrained=True)
    message = str(info.value)
    assert name in message and expected in message
    assert "TORCH_HOME" in message  # tells the user how to point at another cache
    assert not os.path.exists(os.path.join(str(empty_hub), "hub", "checkpoints"))  # nothing fetched


def test_pretrained_loads_a_planted_weight_file_and_replaces_only_the_head(empty_hub):
    torch.manual_seed(1)
    source = build_model("resnet18", num_outputs=1000)
    path = pretrained_weights_path("resnet18")
    os.makedirs(os.path.dirname(path))
    torch.save(source.state_dict(), path)

    model = build_model("resnet18", num_outputs=3, pretrained=True)

    assert model.fc.out_features == 3
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    # A model built without weights is initialised afresh, so it differs from the planted file.
    assert not torch.equal(build_model("resnet18", num_outputs=3).conv1.weight, source.conv1.weight)


def test_a_corrupt_weight_file_is_a_model_error_naming_the_file(empty_hub):
    path = pretrained_weights_path("resnet18")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as handle:
        handle.write(b"not a checkpoint")
    with pytest.raises(ModelError, match=path):
        build_model("resnet18", num_outputs=2, pretrained=True)


def test_weights_of_another_architecture_are_a_model_error(empty_hub):
    path = pretrained_weights_path("resnet18")
    os.makedirs(os.path.dirname(path))
    torch.save(TinyCNN(num_outputs=1000).state_dict(), path)
    with pytest.raises(ModelError, match="resnet18"):
        build_model("resnet18", num_outputs=2, pretrained=True)


def test_descriptions_cover_every_model_with_a_parameter_count():
    described = describe_models()
    assert [name for name, _ in described] == list_available_models()
    for name, text in described:
        assert text and "\n" not in text
        assert "params" in text, name


# ---------------------------------------------------------------------------------------- input sizes
def _runs_on_cpu(name: str, size: int) -> bool:
    """The ground truth the meta-device search must agree with: a real forward pass."""
    model = build_model(name, num_outputs=2).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", list_available_models())
def test_smallest_scale_is_where_a_real_forward_starts_to_work(name):
    smallest = smallest_scale(name, num_outputs=2)
    assert _runs_on_cpu(name, smallest)
    check_model_scales(name, (smallest, smallest + 16), num_outputs=2)
    if smallest > 1:
        assert not _runs_on_cpu(name, smallest - 1)
        with pytest.raises(ModelError) as info:
            check_model_scales(name, (smallest - 1, smallest), num_outputs=2)
        message = str(info.value)
        assert "\n" not in message
        assert name in message and f"{smallest - 1} px" in message and f"{smallest} px" in message


def test_some_registered_model_has_a_smallest_scale_so_the_check_is_exercised():
    assert any(smallest_scale(name, num_outputs=2) > 1 for name in list_available_models())


def test_the_cpu_search_agrees_when_the_meta_device_cannot_answer(monkeypatch):
    name = max(list_available_models(), key=lambda n: smallest_scale(n, num_outputs=2))
    expected = smallest_scale(name, num_outputs=2)
    real_runs = input_size._runs

    def meta_without_kernels(model, size, device):
        if device.type == "meta":
            raise NotImplementedError("no meta kernel for this operator")
        return real_runs(model, size, device)

    monkeypatch.setattr(input_size, "_runs", meta_without_kernels)
    smallest_scale.cache_clear()
    try:
        assert smallest_scale(name, num_outputs=2) == expected
    finally:
        smallest_scale.cache_clear()


def test_smallest_scale_builds_each_model_once_per_head_width(monkeypatch):
    builds = []
    real_build = input_size.build_model
    monkeypatch.setattr(input_size, "build_model", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    smallest_scale.cache_clear()
    try:
        for _ in range(3):
            check_model_scales(TINY_CNN, (32, 48), num_outputs=5)
        assert len(builds) == 1
    finally:
        smallest_scale.cache_clear()


def test_scale_check_of_an_unknown_model_lists_the_available_names():
    with pytest.raises(ModelError, match="'resnet9000'"):
        check_model_scales("resnet9000", (32,), num_outputs=2)
