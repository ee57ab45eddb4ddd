"""Parameter types of the command line: comma-separated lists parsed once, with the library's rules.

A bad value is a :class:`ConfigError` naming the flag, so it reads like every other user error
(``Error: --scales: ...``, exit 2) rather than click's multi-line usage message.
"""

from __future__ import annotations

from typing import Any

import click

from multiscale_dali.constants import TTA_CHOICES
from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.schedule import parse_scales


def _key(param: click.Parameter | None, default: str) -> str:
    return param.name if param is not None and param.name else default


class ScaleList(click.ParamType):
    """``64,96,128`` -> ``(64, 96, 128)``: positive, strictly increasing integers (``parse_scales``)."""

    name = "scales"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "S1,S2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        try:
            return parse_scales(value)
        except ValueError as err:
            raise ConfigError(_key(param, "scales"), str(err)) from None


class CountList(click.ParamType):
    """``0,2,4`` -> ``(0, 2, 4)``: non-negative integers, e.g. worker counts to sweep."""

    name = "counts"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "N1,N2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            counts = tuple(int(item) for item in items if str(item).strip())
        except ValueError:
            counts = ()
        if not counts or any(count < 0 for count in counts):
            raise ConfigError(_key(param, "counts"), f"{value!r} is not a comma-separated list of "
                                                     "non-negative integers, e.g. 0,2,4")
        return counts


class OneOf(click.ParamType):
    """One of a fixed set of words; anything else is a one-line :class:`ConfigError` naming the flag
    and the allowed values (click.Choice prints its usage block instead)."""

    name = "choice"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value in self.choices:
            return str(value)
        raise ConfigError(_key(param, "choice"), f"{value!r} is not one of {', '.join(self.choices)}")


SCALES = ScaleList()
COUNTS = CountList()
TTA = OneOf(TTA_CHOICES)
