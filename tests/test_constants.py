"""The choice enums of constants and the plain-string tuples flags, configs and checkpoints read."""

from __future__ import annotations

import io

import click
import pytest
import torch

from multiscale_dali.constants import (
    AUTO_AUGMENT_POLICIES,
    BACKENDS,
    CONSISTENCY_TYPES,
    MODES,
    SELECT_ON,
    TASKS,
    TEACHERS,
    AutoAugmentPolicy,
    Backend,
    ConsistencyType,
    Mode,
    SelectOn,
    Task,
    Teacher,
)
from multiscale_dali.pipelines.factory import resolve_backend

PAIRS = [(BACKENDS, Backend), (MODES, Mode), (TASKS, Task), (CONSISTENCY_TYPES, ConsistencyType),
         (TEACHERS, Teacher), (AUTO_AUGMENT_POLICIES, AutoAugmentPolicy), (SELECT_ON, SelectOn)]


@pytest.mark.parametrize(("choices", "enum_type"), PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_choice_tuples_list_every_member_as_a_plain_string(choices, enum_type) -> None:
    assert choices == tuple(enum_type)  # same values, same order
    assert all(type(choice) is str for choice in choices)


@pytest.mark.parametrize(("choices", "enum_type"), PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_click_choice_of_the_tuple_accepts_the_lowercase_values(choices, enum_type) -> None:
    # click matches Enum members by name ("DALI"); the tuples must keep `--backend dali` working.
    choice = click.Choice(choices)
    for member in enum_type:
        assert choice.convert(member.value, None, None) == member


def test_a_resolved_backend_loads_from_a_weights_only_checkpoint() -> None:
    buffer = io.BytesIO()
    torch.save({"backend": resolve_backend(Backend.TORCHVISION)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {"backend": "torchvision"}
