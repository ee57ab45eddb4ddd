"""The base of every error that is the user's to fix: the CLI turns it into one line and an exit code.

A subclass says what the CLI shows in its class line, so the library keeps the knowledge of which
input an error is about next to the error, and the CLI translates every one of them in one place::

    class DataError(UserError, ValueError, flag="--data"): ...
    class BadImagesError(UserError, ValueError, exit_code=1, hint="Or train without them: ..."): ...
"""

from __future__ import annotations

# click's own code for a bad command line; the CLI uses it for every error that names a flag.
EXIT_USAGE = 2
# The command line was fine, yet the command cannot go on (bad images, a missing optional package).
EXIT_FAILURE = 1


class UserError(Exception):
    """Bad input (a flag, a file, a directory); the message names it and says what would work.

    ``flag`` is the command-line flag the CLI puts in front of the message (empty: the message names
    the input itself), ``hint`` a line the CLI prints after it, ``exit_code`` the code it exits with.
    """

    flag: str = ""
    hint: str = ""
    exit_code: int = EXIT_USAGE

    def __init_subclass__(cls, *, flag: str | None = None, hint: str | None = None, exit_code: int | None = None,
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if flag is not None:
            cls.flag = flag
        if hint is not None:
            cls.hint = hint
        if exit_code is not None:
            cls.exit_code = exit_code

    @property
    def detail(self) -> str:
        """The message without the flag."""
        return str(self)

    def user_message(self) -> str:
        """What the command line shows: ``FLAG: message``, then the hint on a line of its own."""
        text = f"{self.flag}: {self.detail}" if self.flag else self.detail
        return f"{text}\n{self.hint}" if self.hint else text


class ConfigError(UserError, ValueError):
    """A bad configuration value; ``key`` is the field (the CLI shows it as ``--key-name``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    @property
    def flag(self) -> str:  # type: ignore[override]  # one flag per key, not per class
        return "--" + self.key.replace("_", "-")

    @property
    def detail(self) -> str:
        return self.message


class OutOfMemoryError(UserError, RuntimeError, exit_code=EXIT_FAILURE,
                       hint="Lower --batch-size or the largest of --scales (memory grows with batch x scale^2), "
                            "or try --memory-efficient."):
    """An allocation failed (host or device): the batch or the scales are too large for this machine."""


# What an allocation failure says, wherever it happens: torch's CPU allocator, CUDA, DALI (C++
# std::bad_alloc), NumPy and Pillow (MemoryError, whose message may be empty).
_OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
                          "failed to allocate")


def out_of_memory_reason(err: BaseException) -> str | None:
    """The line of ``err``'s message that says memory ran out; None when it is another error."""
    text = str(err)
    for line in text.splitlines():
        if any(marker in line.lower() for marker in _OUT_OF_MEMORY_MARKERS):
            return line.strip()[:300]
    if isinstance(err, MemoryError):
        return text.strip()[:300] or "MemoryError"
    return None
