"""ONNX export: both input layouts, dynamic and fixed shapes, verification against PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from multiscale_dali.errors import ConfigError, UserError
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.models.registry import build_model
from conftest import synthetic_image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from multiscale_dali.evaluation import export  # noqa: E402  (after the extra is known to be present)

SCALES = (32, 48)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = build_model("tiny_cnn", num_outputs=3)
    # Non-trivial BatchNorm statistics, so a graph that ignored them would not match.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 40, 40) * 2 + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(((70, 50), (64, 64), (45, 90)))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {
        "dynamic_pre": export.export_onnx(model, scales=SCALES, dynamic=True, with_preprocessing=True,
                                          out=root / "pre.onnx", metadata={"classes": "a,b,c"}),
        "dynamic_raw": export.export_onnx(model, scales=SCALES, dynamic=True, with_preprocessing=False,
                                          out=root / "raw.onnx"),
        "fixed_pre": export.export_onnx(model, scales=(48,), dynamic=False, with_preprocessing=True,
                                        out=root / "fixed.onnx"),
    }


def test_dynamic_exports_match_pytorch_at_every_scale_in_both_layouts(exported, model, images):
    for key in ("dynamic_pre", "dynamic_raw"):
        report = export.verify_onnx(exported[key], model, images, scales=SCALES, tolerance=1e-4)
        assert set(report["scales"]) == {str(s) for s in SCALES}
        assert report["max_abs_diff"] <= 1e-4
        assert report["agreement"] == 1.0
        assert report["num_images"] == len(images)


def test_the_layout_is_detected_from_the_graph_input(exported):
    pre = export.OnnxClassifier(exported["dynamic_pre"])
    raw = export.OnnxClassifier(exported["dynamic_raw"])
    assert (pre.input_layout, pre.input_size) == (export.UINT8_NHWC, None)
    assert (raw.input_layout, raw.input_size) == (export.FLOAT_NCHW, None)
    assert pre.metadata["classes"] == "a,b,c"
    assert pre.metadata[export.META_SCALES] == "32,48"


def test_both_layouts_predict_the_same_logits_from_uint8_batches(exported, images):
    batch = export.eval_batch(images, 32).numpy()
    pre = export.OnnxClassifier(exported["dynamic_pre"]).predict(batch)
    raw = export.OnnxClassifier(exported["dynamic_raw"]).predict(torch.from_numpy(batch))
    assert pre.shape == (len(images), 3)
    np.testing.assert_allclose(pre, raw, atol=1e-4)


def test_a_fixed_export_takes_its_one_scale_and_names_the_size_it_needs(exported, model, images):
    classifier = export.OnnxClassifier(exported["fixed_pre"])
    assert classifier.input_size == (48, 48)
    assert export.verify_onnx(exported["fixed_pre"], model, images, scales=(48,))["agreement"] == 1.0
    with pytest.raises(export.OnnxInputError, match=r"fixed.onnx.*48x48.*32x32"):
        export.verify_onnx(exported["fixed_pre"], model, images, scales=(32,))


def test_a_fixed_export_of_several_scales_is_refused(model, tmp_path):
    with pytest.raises(ConfigError, match="exactly one scale"):
        export.export_onnx(model, scales=SCALES, dynamic=False, with_preprocessing=True, out=tmp_path / "x.onnx")


def test_verify_names_the_scale_where_the_export_drifts(exported, model, images):
    drifted = build_model("tiny_cnn", num_outputs=3)
    drifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        drifted.classifier.bias.add_(0.5)
    with pytest.raises(export.OnnxMismatchError, match="at 32 px") as caught:
        export.verify_onnx(exported["dynamic_pre"], drifted.eval(), images, scales=SCALES)
    assert isinstance(caught.value, UserError)
    assert caught.value.max_abs_diff == pytest.approx(0.5, abs=1e-3)


def test_verify_accepts_a_batch_array(exported, model, images):
    batch = np.stack([synthetic_image(60, 60, seed=s) for s in range(2)])
    report = export.verify_onnx(exported["dynamic_raw"], model, batch, scales=(48,))
    assert report["num_images"] == 2


def test_export_leaves_the_callers_model_untouched(model, tmp_path):
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        export.export_onnx(model, scales=(32,), dynamic=True, with_preprocessing=False, out=tmp_path / "m.onnx")
        assert model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_onnx_file_with_another_input_is_rejected_naming_file_and_expected_input(tmp_path):
    class Flat(nn.Module):
        def forward(self, x):
            return x.sum(dim=1, keepdim=True)

    path = tmp_path / "flat.onnx"
    torch.onnx.export(Flat(), (torch.zeros(2, 10),), str(path), dynamo=False, input_names=["x"])
    with pytest.raises(export.OnnxInputError, match=r"flat\.onnx.*expected uint8 \[batch, height, width, 3\]"):
        export.OnnxClassifier(path)


def test_predict_rejects_a_float_batch(exported):
    with pytest.raises(export.OnnxInputError, match=r"pre\.onnx.*uint8 \[batch, height, width, 3\]"):
        export.OnnxClassifier(exported["dynamic_pre"]).predict(np.zeros((1, 32, 32, 3), dtype=np.float32))


def test_missing_or_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(export.ExportError, match="not found"):
        export.OnnxClassifier(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(export.ExportError, match=r"bad\.onnx is not a loadable ONNX model"):
        export.OnnxClassifier(bad)


def test_without_the_extra_the_error_says_what_to_install(monkeypatch, model, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(MissingExtraError, match=r"multiscale-dali\[export\]") as caught:
        export.export_onnx(model, scales=(32,), dynamic=True, with_preprocessing=True, out=tmp_path / "m.onnx")
    assert caught.value.extra == "export"
