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


class FractionList(click.ParamType):
    """``0.8,0.1,0.1`` -> ``(0.8, 0.1, 0.1)``: train, val, test fractions (``validate_fractions``)."""

    name = "fractions"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "TRAIN,VAL,TEST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        from multiscale_dali.data.discovery import validate_fractions

        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            return validate_fractions([float(item) for item in items if str(item).strip()])
        except ValueError as err:
            raise ConfigError(_key(param, "split_fractions"), f"{value!r}: {err}") from None


# Binary units, as file sizes are usually meant ("256MB" is 256 MiB); a bare number is bytes.
_BYTE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
               "G": 2**30, "GB": 2**30, "GIB": 2**30}


class ByteSize(click.ParamType):
    """``256MB`` -> 268435456: a size in bytes, with an optional K/M/G unit (powers of 1024)."""

    name = "size"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "SIZE[K|M|G]B"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        try:
            size = float(number) * _BYTE_UNITS[unit]
        except (ValueError, KeyError):
            raise ConfigError(_key(param, "size"), f"{value!r} is not a size such as 256MB, 1GB or 65536") from None
        if size < 1 or not size.is_integer():
            raise ConfigError(_key(param, "size"), f"{value!r} is not a whole, positive number of bytes")
        return int(size)


SCALES = ScaleList()
COUNTS = CountList()
TTA = OneOf(TTA_CHOICES)
FRACTIONS = FractionList()
BYTE_SIZE = ByteSize()
