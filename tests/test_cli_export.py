"""`msdali export` end to end, and `msdali predict` on the ONNX file it writes.

One tiny trained run (tiny_cnn, 3 classes, 32/48 px) serves the module; onnx and onnxruntime are the
export extra (the tests skip without it, except the one that checks the error without it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from deploy_runs import make_split_folder, train_tiny_run
from multiscale_dali.cli.main import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
# The tests build foreign ONNX files with the TorchScript exporter, as export.py does; its notices are noise.
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript",
                                        "ignore:The feature will be removed")


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    # Shared BatchNorm: one dynamic ONNX graph is then the very network at every scale (a model with
    # BatchNorm private to each scale exports one branch; see the test of that below).
    return train_tiny_run(make_split_folder(root / "data"), root / "run", scale_norm="shared")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = _cli("export", "--checkpoint", str(run), "--scales", "32,48", "--dynamic", "--with-preprocessing",
                  "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def _test_images(run: Path) -> list[str]:
    data = Path(json.loads((run.parent / "config.json").read_text())["resolved"]["data"])
    return sorted(str(p) for p in (data / "test").rglob("*.jpg"))


def test_export_verifies_every_scale_on_the_runs_test_images_and_writes_the_figures(exported):
    report = json.loads(exported.with_name("model.verify.json").read_text())
    assert report["split"] == "test" and report["num_images"] == 9  # 3 classes x 3 test images
    assert set(report["scales"]) == {"32", "48"}
    for figures in report["scales"].values():
        assert figures["max_abs_diff"] <= report["tolerance"] and figures["agreement"] == 1.0
    assert report["input_layout"] == "uint8_nhwc" and report["classes"] == ["class_0", "class_1", "class_2"]


def test_predict_with_the_onnx_file_matches_predict_with_the_checkpoint(run, exported):
    images = _test_images(run)[:4]
    for extra in ([], ["--scales", "32,48", "--tta", "flip"]):
        from_onnx = _cli("predict", "--checkpoint", str(exported), *images, *extra)
        from_torch = _cli("predict", "--checkpoint", str(run), "--device", "cpu", *images, *extra)
        assert from_onnx.exit_code == 0 and from_torch.exit_code == 0, from_onnx.output + from_torch.output
        onnx_lines = [line.split("\t") for line in from_onnx.output.splitlines()]
        torch_lines = [line.split("\t") for line in from_torch.output.splitlines()]
        assert [line[:2] for line in onnx_lines] == [line[:2] for line in torch_lines]
        assert [float(line[2]) for line in onnx_lines] == pytest.approx([float(x[2]) for x in torch_lines], abs=2e-4)


def test_a_fixed_export_serves_its_one_scale_and_refuses_another(run, tmp_path):
    out = tmp_path / "fixed.onnx"
    result = _cli("export", "--checkpoint", str(run), "--scale", "48", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "48px: max |logit diff|" in result.output
    image = _test_images(run)[0]
    assert _cli("predict", "--checkpoint", str(out), image).exit_code == 0  # its own size by default
    wrong = _cli("predict", "--checkpoint", str(out), image, "--scale", "32")
    assert wrong.exit_code == 2 and "exported for 48x48 input, got 32x32" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1


def test_a_logit_difference_beyond_the_tolerance_is_an_error_naming_the_scale(run, tmp_path):
    out = tmp_path / "strict.onnx"
    result = _cli("export", "--checkpoint", str(run), "--scale", "32", "--out", str(out), "--tolerance", "1e-30")
    assert result.exit_code == 2, result.output
    assert "at 32 px the ONNX logits differ" in result.output and "tolerance 1e-30" in result.output
    assert not out.exists() and (tmp_path / "strict.rejected.onnx").exists()  # kept aside for inspection
    assert str(tmp_path / "strict.rejected.onnx") in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.rejected.onnx"]


def test_several_scales_without_dynamic_shapes_are_refused(run, tmp_path):
    result = _cli("export", "--checkpoint", str(run), "--scales", "32,48", "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 2 and result.output.startswith("Error: --scales: a fixed-shape export")
    assert not (tmp_path / "m.onnx").exists()


def test_an_onnx_file_with_another_input_is_refused_naming_it(tmp_path, run):
    class Gray(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "gray.onnx"
    torch.onnx.export(Gray(), (torch.zeros(1, 1, 32, 32),), str(path), dynamo=False, input_names=["x"])
    result = _cli("predict", "--checkpoint", str(path), _test_images(run)[0])
    assert result.exit_code == 2
    assert f"{path}: its input is tensor(float) [1, 1, 32, 32]" in result.output


def test_an_onnx_file_not_written_by_export_is_refused_naming_what_it_lacks(tmp_path, run):
    path = tmp_path / "plain.onnx"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    result = _cli("predict", "--checkpoint", str(path), _test_images(run)[0])
    assert result.exit_code == 2 and "lacks the metadata msdali.classes" in result.output


def test_without_the_export_extra_the_error_names_it(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = _cli("export", "--checkpoint", str(run), "--scale", "32", "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 1
    assert "pip install 'multiscale-dali[export]'" in result.output


def test_a_model_with_private_norms_exports_the_branch_of_its_largest_exported_scale(tmp_path):
    run = train_tiny_run(make_split_folder(tmp_path / "data"), tmp_path / "run")  # multiscale default: private
    out = tmp_path / "private.onnx"
    result = _cli("export", "--checkpoint", str(run), "--scales", "48", "--out", str(out))
    assert result.exit_code == 0, result.output
    images = _test_images(run)[:3]
    from_onnx = _cli("predict", "--checkpoint", str(out), *images)
    from_torch = _cli("predict", "--checkpoint", str(run), "--device", "cpu", "--scales", "48", *images)
    assert from_onnx.exit_code == 0 and from_torch.exit_code == 0, from_onnx.output + from_torch.output
    onnx_scores = [float(line.split("\t")[2]) for line in from_onnx.output.splitlines()]
    torch_scores = [float(line.split("\t")[2]) for line in from_torch.output.splitlines()]
    assert onnx_scores == pytest.approx(torch_scores, abs=2e-4)
