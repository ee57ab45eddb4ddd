"""timm models: built resolution-independent, pretrained weights only from the local caches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from multiscale_dali.errors import UserError
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.models import timm_models
from multiscale_dali.models.timm_models import (
    TimmModelError,
    build_timm_model,
    cached_weights,
    check_resolution_independence,
    list_timm_models,
)

timm = pytest.importorskip("timm")
SCALES = (64, 96)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _cache_hf_weights(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay a weight file out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/file."""
    from safetensors.torch import save_file

    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_the_test_models_are_listed():
    names = list_timm_models("test_*")
    assert {"test_vit", "test_resnet"} <= set(names)
    assert all(name.startswith("test_") for name in names)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "timm:test_resnet"])
def test_built_models_run_at_every_scale(name):
    model = build_timm_model(name, num_outputs=3)
    check_resolution_independence(model, scales=SCALES)
    assert model(torch.zeros(1, 3, 96, 96)).shape == (1, 3)
    assert model.training  # the check leaves the mode as it was


def test_a_vit_with_a_fixed_image_size_fails_the_check_naming_the_scale():
    fixed = timm.create_model("vit_tiny_patch16_224", num_classes=3)  # without dynamic_img_size: 224 px only
    with pytest.raises(TimmModelError, match="does not run at 64 px") as caught:
        check_resolution_independence(fixed, scales=SCALES)
    assert isinstance(caught.value, UserError)


def test_logits_that_change_shape_with_the_input_fail_the_check():
    class Unpooled(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(TimmModelError, match="at 96 px but .* at 64 px"):
        check_resolution_independence(Unpooled(), scales=SCALES)


def test_uncached_pretrained_weights_name_the_expected_path_and_download_nothing(empty_caches):
    with pytest.raises(TimmModelError) as caught:
        build_timm_model("test_vit", num_outputs=3, pretrained=True)
    message = str(caught.value)
    assert str(empty_caches / "hf" / "models--timm--test_vit.r160_in1k") in message
    assert "model.safetensors" in message and "nothing is downloaded" in message
    assert not (empty_caches / "hf").exists()  # no download was started into the cache


def test_cached_pretrained_weights_load_with_a_new_head(empty_caches):
    source = timm.create_model("test_resnet", num_classes=1000)
    path = _cache_hf_weights(empty_caches / "hf", "timm/test_resnet.r160_in1k", source.state_dict())
    assert cached_weights("test_resnet") == path
    model = build_timm_model("test_resnet", num_outputs=3, pretrained=True)
    body = model.state_dict()
    assert torch.equal(body["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert model.get_classifier().out_features == 3


def test_weights_timm_does_not_publish_are_refused():
    with pytest.raises(TimmModelError, match="no pretrained weights"):
        cached_weights("test_vit4")


def test_unknown_and_hub_names_are_refused():
    with pytest.raises(TimmModelError, match="unknown timm model 'no_such_net'"):
        build_timm_model("no_such_net", num_outputs=2)
    with pytest.raises(TimmModelError, match="only timm registry names"):
        build_timm_model("hf-hub:timm/resnet18.a1_in1k", num_outputs=2)


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r"multiscale-dali\[timm\]") as caught:
        timm_models.build_timm_model("test_vit", num_outputs=2)
    assert caught.value.extra == "timm"
