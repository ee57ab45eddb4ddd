"""Optional dependencies (setup.cfg extras): one error type whose message says what to install."""

from __future__ import annotations

PACKAGE = "multiscale-dali"


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the pip command that fixes it."""

    def __init__(self, *, feature: str, extra: str, cause: BaseException | None = None) -> None:
        hint = f"pip install '{PACKAGE}[{extra}]'"
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(f"{feature} needs the optional '{extra}' dependencies: {hint}{detail}")
        self.extra = extra
        self.hint = hint
