"""Weight EMA: an exponential moving average of the model's parameters, evaluated instead of the model.

Behaves like timm's ``ModelEmaV3``: a deep copy of the (unwrapped) model whose floating-point
parameters follow ``ema = decay * ema + (1 - decay) * model`` after every optimiser step, done on the
device with one ``torch._foreach_lerp_`` over all of them. The decay warms up (see :func:`ema_decay`)
so the average is not dominated by the random initialisation early on.

Buffers (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``) are **copied** from the
model by default: the running statistics already are averages, of the current weights' activations,
which is what the averaged weights are closest to. ``ema_buffers=True`` averages the floating-point
buffers like the parameters instead (timm's default); integer buffers are always copied.

A model wrapped by ``DistributedDataParallel``/``DataParallel`` or compiled by ``torch.compile`` is
unwrapped first (:func:`unwrap_model`), so the average's state-dict keys are the bare model's.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

# TensorFlow's tf.train.ExponentialMovingAverage(num_updates=n) warm-up: the effective decay is
# min(decay, (1 + n) / (10 + n)), so the first updates copy most of the model (0.1 at n = 0, 0.5 at
# n = 8) and the configured decay takes over after 9 / (1 - decay) updates. No extra knob, unlike
# timm's 1 - (1 + n / gamma) ** -power, whose defaults (gamma 1, power 2/3) need ~350k updates to reach
# a decay of 0.9998, longer than the runs this project makes.
WARMUP_OFFSET = 10


def ema_decay(step: int, *, decay: float, warmup: bool = True) -> float:
    """The decay of update number ``step`` (0 for the first): ``min(decay, (1 + step) / (10 + step))``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(decay, (1 + step) / (WARMUP_OFFSET + step)) if warmup else decay


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _paired(ema: list[tuple[str, torch.Tensor]], raw: list[tuple[str, torch.Tensor]], what: str) -> None:
    if [name for name, _ in ema] != [name for name, _ in raw]:
        raise ValueError(f"the model's {what} do not match the EMA's: update() needs the model the EMA was built from")


class ModelEma:
    """An EMA of ``model``'s weights. Call :meth:`update` after every optimiser step; evaluate :attr:`module`.

    ``decay`` in [0, 1] (0 copies the model, 1 freezes the average); ``warmup`` applies
    :func:`ema_decay`'s warm-up; ``ema_buffers`` averages floating-point buffers instead of copying them.
    :meth:`state_dict` holds tensors and ints only, so it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self, model: nn.Module, *, decay: float = 0.9998, warmup: bool = True, ema_buffers: bool = False
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.ema_buffers = bool(ema_buffers)
        self._module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self._step = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model, in eval mode and without gradients (it is never trained)."""
        return self._module

    @property
    def step(self) -> int:
        """How many updates have been applied."""
        return self._step

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return ema_decay(self._step, decay=self.decay, warmup=self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward ``model`` (the trained model, wrapped or not) by one step."""
        raw = unwrap_model(model)
        weight = 1.0 - self.current_decay()
        ema_params, raw_params = list(self._module.named_parameters()), list(raw.named_parameters())
        _paired(ema_params, raw_params, "parameters")
        ema_buffers, raw_buffers = list(self._module.named_buffers()), list(raw.named_buffers())
        _paired(ema_buffers, raw_buffers, "buffers")
        pairs = [(e, r, True) for (_, e), (_, r) in zip(ema_params, raw_params)]
        pairs += [(e, r, self.ema_buffers) for (_, e), (_, r) in zip(ema_buffers, raw_buffers)]
        lerp_ema, lerp_raw = [], []
        for ema_t, raw_t, average in pairs:
            if average and ema_t.is_floating_point():
                lerp_ema.append(ema_t)
                lerp_raw.append(raw_t.detach())
            else:
                ema_t.copy_(raw_t)  # integer tensors, and buffers unless ema_buffers
        if lerp_ema:
            # lerp(ema, model, 1 - d) = d * ema + (1 - d) * model, one fused kernel per dtype/device.
            torch._foreach_lerp_(lerp_ema, lerp_raw, weight)
        self._step += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"module": the average's state dict, "step": updates applied}``."""
        return {"module": self._module.state_dict(), "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next update is the one the saving run would have made."""
        step = state.get("step") if isinstance(state, Mapping) else None
        module = state.get("module") if isinstance(state, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(module, Mapping):
            raise ValueError("EMA state needs 'module' (a state dict) and 'step' (an int >= 0), "
                             "as written by ModelEma.state_dict()")
        self._module.load_state_dict(module)
        self._step = step
