"""What can be checked of the container without a Docker engine."""

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(maxsplit=1)) for line in lines]


def test_dockerfile_builds_on_an_ngc_pytorch_image():
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in _instructions() if k == "ARG" and "=" in v}
    froms = [v for k, v in _instructions() if k == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", args["BASE_IMAGE"])


def test_dockerfile_installs_the_project_without_replacing_the_image_torch_or_dali():
    runs = " ".join(v for k, v in _instructions() if k == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in runs
    for pinned in ("torch==", "torchvision==", "nvidia-dali"):
        assert pinned not in runs, f"{pinned} would fight the NGC image's own build"
    copied = " ".join(v for k, v in _instructions() if k == "COPY")
    for needed in ("setup.cfg", "setup.py", "multiscale_dali", "pipelines"):
        assert needed in copied


def test_dockerfile_entry_point_is_msdali():
    entry = [v for k, v in _instructions() if k == "ENTRYPOINT"]
    assert entry == ['["msdali"]']
