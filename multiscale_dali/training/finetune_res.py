"""FixRes fine-tuning (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"): the pure parts.

A network trained on random-resized crops sees objects larger than the centre crops it is tested on,
and its BatchNorm statistics describe the training view. FixRes fixes this after training with a
short fine-tuning at the test resolution in which only the BatchNorm affine parameters and the
classifier learn, with the BatchNorm layers in train mode (their running statistics re-estimate at
the new resolution) and every other layer in eval mode (dropout and stochastic depth off, so the
features feeding the statistics are the test-time ones).

:func:`freeze_for_fixres` prepares a model for that: it turns ``requires_grad`` off everywhere but
those parameters and returns a :class:`FixResPlan` whose ``parameters`` go to the optimiser.

Finding the head: the classifier is taken to be the LAST ``nn.Linear`` in module registration order
(``model.named_modules()``). That is the head of every registry model (``TinyCNN.classifier``,
ResNet ``fc``, the last layer of MobileNet/EfficientNet/ConvNeXt ``classifier``) and of timm models
(``head``/``fc``/``classifier``, registered last). A model whose head is not a Linear, or whose last
registered Linear is not the head, is not supported; the plan names the layer it chose.

Modes: trainers call ``model.train()`` at every epoch start (``MultiScaleTrainer.train_epoch`` does),
which would switch dropout back on. So the plan also installs a forward pre-hook on the model that,
whenever the model is in train mode, puts every module in eval mode except the BatchNorm layers;
``model.eval()`` still puts everything, BatchNorm included, in eval mode for validation. Hooks are not
part of ``state_dict``, so checkpoints keep their keys. ``plan.remove_hook()`` undoes it.

Without BatchNorm (ConvNeXt uses LayerNorm, ViTs too) there are no statistics to fix: the plan has
``classifier_only=True`` and trains the head alone; :meth:`FixResPlan.describe` says so in words the
CLI can print.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from multiscale_dali.errors import UserError

log = logging.getLogger(__name__)

_BATCHNORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d and SyncBatchNorm


class FixResError(UserError, ValueError):
    """A model FixRes fine-tuning cannot prepare (no classifier head found); names the model."""


@dataclass(frozen=True)
class FixResPlan:
    """What :func:`freeze_for_fixres` left trainable: pass ``parameters`` to the optimiser."""

    parameters: tuple[nn.Parameter, ...]
    head: str  # qualified module name of the classifier Linear
    batchnorm_layers: tuple[str, ...]  # qualified names of the BatchNorm layers (train mode)
    trainable_count: int  # scalar parameters left trainable
    frozen_count: int  # scalar parameters frozen
    hook: RemovableHandle | None = field(default=None, compare=False, repr=False)

    @property
    def classifier_only(self) -> bool:
        """True when the model has no BatchNorm: only the classifier head is fine-tuned."""
        return not self.batchnorm_layers

    def describe(self) -> str:
        """One line for the user: what is fine-tuned."""
        if self.classifier_only:
            return (f"the model has no BatchNorm layers: fine-tuning the classifier only ({self.head}, "
                    f"{self.trainable_count:,} parameters)")
        return (f"fine-tuning the affine parameters of {len(self.batchnorm_layers)} BatchNorm layers (statistics "
                f"re-estimated in train mode) and the classifier {self.head}: {self.trainable_count:,} of "
                f"{self.trainable_count + self.frozen_count:,} parameters")

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head, "batchnorm_layers": len(self.batchnorm_layers),
                "classifier_only": self.classifier_only, "trainable_parameters": self.trainable_count,
                "frozen_parameters": self.frozen_count}

    def remove_hook(self) -> None:
        """Stop enforcing the FixRes modes (``model.train()`` then trains every layer normally)."""
        if self.hook is not None:
            self.hook.remove()


def find_classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(qualified name, layer)`` of the last ``nn.Linear`` in registration order (see module doc)."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise FixResError(f"{type(model).__name__} has no nn.Linear layer to use as the classifier head; "
                          "FixRes fine-tuning needs a linear classifier")
    return linears[-1]


def apply_fixres_modes(model: nn.Module) -> None:
    """Every module in eval mode except the BatchNorm layers, which are put in train mode."""
    for module in model.modules():
        module.training = isinstance(module, _BATCHNORM)


def _enforce_modes(model: nn.Module, _inputs: Any) -> None:
    # The root in train mode means someone called model.train() since the last forward: undo it for
    # everything but BatchNorm. apply_fixres_modes leaves the root in eval mode, so this runs once
    # per train() call, not every step.
    if model.training:
        apply_fixres_modes(model)


def freeze_for_fixres(model: nn.Module, *, enforce_modes: bool = True) -> FixResPlan:
    """Leave only the BatchNorm affine parameters and the classifier head trainable.

    Sets ``requires_grad`` on every parameter of ``model`` and puts it in FixRes modes (BatchNorm
    train, the rest eval). ``enforce_modes``: also keep those modes across later ``model.train()``
    calls (a forward pre-hook, see the module doc). Raises :class:`FixResError` when no Linear head
    is found.
    """
    head_name, head = find_classifier_head(model)
    norms = [(name, module) for name, module in model.named_modules() if isinstance(module, _BATCHNORM)]
    trainable: dict[int, nn.Parameter] = {}
    for _, norm in norms:
        for param in (norm.weight, norm.bias):  # None when affine=False
            if param is not None:
                trainable[id(param)] = param
    for param in head.parameters():
        trainable[id(param)] = param
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    # model.parameters() order (deduplicated), so the optimiser's state lines up run after run.
    ordered = tuple(p for p in dict.fromkeys(model.parameters()) if id(p) in trainable)
    trainable_count = sum(p.numel() for p in ordered)
    frozen_count = sum(p.numel() for p in dict.fromkeys(model.parameters())) - trainable_count
    apply_fixres_modes(model)
    hook = model.register_forward_pre_hook(_enforce_modes) if enforce_modes else None
    plan = FixResPlan(parameters=ordered, head=head_name, batchnorm_layers=tuple(name for name, _ in norms),
                      trainable_count=trainable_count, frozen_count=frozen_count, hook=hook)
    if plan.classifier_only:
        log.warning("%s", plan.describe())
    else:
        log.info("%s", plan.describe())
    return plan
