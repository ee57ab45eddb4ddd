"""Optional dependencies (setup.cfg extras): one error type whose message says what to install."""

from __future__ import annotations

from multiscale_dali.errors import EXIT_FAILURE, UserError

PACKAGE = "multiscale-dali"


class MissingExtraError(UserError, RuntimeError, exit_code=EXIT_FAILURE):
    """An optional dependency is not installed; the message names the pip command that fixes it."""

    def __init__(self, *, feature: str, extra: str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(f"{feature} needs the optional '{extra}' dependencies: "
                         f"pip install '{PACKAGE}[{extra}]'{detail}")
        self.extra = extra
