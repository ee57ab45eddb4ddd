"""Automatic image augmentation (TrivialAugment, RandAugment, AutoAugment), one draw per sample.

The policy is described here, backend-neutrally, by :class:`AutoAugmentSpec`; the torchvision
implementation lives here too (:func:`build_tv_auto_augment`) and the DALI one in
``pipelines.dali.augment``. Both backends apply it **once** to the uint8 crop at the largest scale,
after the flip and before the smaller scales are resized from that output, so every scale of a sample
shows the same augmented image and the scale-consistency loss compares like with like.

Both backends follow torchvision's conventions where the libraries differ, so a policy means the same
thing whichever backend runs it: 31 magnitude bins (RandAugment's ``rand_m`` is a bin index in
``0..30``), bilinear interpolation and a grey fill of :data:`AUGMENT_FILL` for the geometric ops, and
translations of at most 32 px (TrivialAugmentWide) or 150/331 of the side (RandAugment, AutoAugment).
The random draws themselves differ between the backends (each library has its own generator), and so
does the AutoAugment ImageNet policy: torchvision ships its own table, DALI the paper's (which also
translates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from multiscale_dali.constants import NUM_MAGNITUDE_BINS
from multiscale_dali.pipelines.augment_policy import check_auto_augment

# NUM_MAGNITUDE_BINS and MAX_RAND_M live in constants (the configuration checks --rand-m without torch).
# Grey padding where a rotation, shear or translation uncovers the canvas: DALI's default fill_value.
# torchvision's default is black; grey keeps the uncovered area near the data's mean in both backends.
AUGMENT_FILL = 128
# Largest translations, torchvision's values: TrivialAugmentWide shifts by up to 32 px whatever the
# size; RandAugment and AutoAugment by up to 150/331 of the side (their 331 px reference image).
TRIVIAL_MAX_TRANSLATE_PX = 32
MAX_TRANSLATE_REL = 150 / 331


@dataclass(frozen=True)
class AutoAugmentSpec:
    """Which automatic augmentation to apply to every training sample.

    ``policy``: ``"none"``, ``"trivial"`` (TrivialAugmentWide), ``"rand"`` (RandAugment with
    ``rand_n`` operations of magnitude bin ``rand_m`` each) or ``"auto"`` (AutoAugment, ImageNet
    policy). ``rand_n`` and ``rand_m`` only matter for ``"rand"`` but are validated always, so a bad
    recipe fails when it is read. timm's ``rand-m9-n2`` is ``AutoAugmentSpec("rand", 2, 9)``.
    """

    policy: str = "none"
    rand_n: int = 2
    rand_m: int = 9

    def __post_init__(self) -> None:
        check_auto_augment(self.policy, self.rand_n, self.rand_m)

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


def _tv_transform(spec: AutoAugmentSpec) -> Callable[[torch.Tensor], torch.Tensor] | None:
    common = {"interpolation": InterpolationMode.BILINEAR, "fill": AUGMENT_FILL}
    if spec.policy == "trivial":
        return v2.TrivialAugmentWide(num_magnitude_bins=NUM_MAGNITUDE_BINS, **common)
    if spec.policy == "rand":
        return v2.RandAugment(
            num_ops=spec.rand_n, magnitude=spec.rand_m, num_magnitude_bins=NUM_MAGNITUDE_BINS, **common
        )
    if spec.policy == "auto":
        return v2.AutoAugment(policy=v2.AutoAugmentPolicy.IMAGENET, **common)
    return None


class TvAutoAugment:
    """The torchvision implementation of an :class:`AutoAugmentSpec`: ``augment(image, seed=s)``.

    ``image`` is uint8 ``[3, H, W]`` (the crop at the largest scale, after the flip); the result has
    the same shape and dtype. The draw is a pure function of ``seed`` and the image: torchvision's
    transforms read the global CPU generator, so the call seeds it inside ``torch.random.fork_rng``,
    which restores the caller's generator state afterwards (nothing leaks, and the loader stays a pure
    function of ``(seed, epoch, index)`` whatever the number of workers). Not safe to call from several
    threads of one process at once, as anything that touches torch's global generator. Picklable, so a
    ``DataLoader`` worker can hold one. With policy ``"none"`` the image is returned unchanged.
    """

    def __init__(self, spec: AutoAugmentSpec) -> None:
        self.spec = spec
        self._transform = _tv_transform(spec)

    def __call__(self, image: torch.Tensor, *, seed: int) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 image shaped [3, H, W], got {image.dtype} {tuple(image.shape)}")
        if self._transform is None:
            return image
        # devices=[]: only the CPU generator is saved and restored; default_generator.manual_seed
        # (not torch.manual_seed) leaves every CUDA generator alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self._transform(image)

    def __repr__(self) -> str:
        return f"TvAutoAugment({self.spec!r})"


def build_tv_auto_augment(spec: AutoAugmentSpec) -> TvAutoAugment:
    """The torchvision implementation of ``spec``; see :class:`TvAutoAugment` for the call."""
    return TvAutoAugment(spec)
