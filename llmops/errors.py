"""The exceptions llmops raises on purpose, each carrying its exit code and a hint that says what to do.

The CLI maps them to a one-line message and an exit code in one place (`llmops.cli.app`); library callers
catch `LlmopsError`.
"""

from __future__ import annotations


class LlmopsError(Exception):
    """A known failure: `message` says what is wrong, `hint` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(LlmopsError):
    """Bad input from the user: an unknown model, an unreadable file, an impossible flag combination."""

    exit_code = 2


class ConfigError(UsageError):
    """A config failed validation; `problems` lists every one of them as (dotted.path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class DoesNotFitError(LlmopsError):
    """The model (or run) does not fit on this hardware; the message gives the numbers."""

    exit_code = 3


class RuntimeFailure(LlmopsError):
    """Something went wrong while running (an engine died, some rows failed)."""

    exit_code = 1


class StorageError(RuntimeFailure):
    """The file system refused: a folder is not writable, the disk is full, a path is not a folder."""

    @classmethod
    def from_os_error(cls, error: OSError, action: str = "access") -> StorageError:
        """`cannot write out/run1/results: permission denied`, naming the folder for a temp file's error."""
        where = str(error.filename) if error.filename is not None else "a file"
        if where.endswith(".tmp"):
            where = where.rsplit("/", 1)[0] if "/" in where else "."
        reason = (error.strerror or str(error)).lower()
        return cls(f"cannot {action} {where}: {reason}")


class Stopped(LlmopsError):
    """Stopped early on request (SIGTERM from a preempted machine, SIGINT): the work done is kept and a
    rerun of the same command finishes the job. 75 is EX_TEMPFAIL: "try again later"."""

    exit_code = 75


class Interrupted(Stopped):
    """A second Ctrl+C while a stop winds down: stop now (what was committed is kept; a rerun finishes the
    job), with the shell's code for an interrupt, 130, as the README's exit-code table says."""

    exit_code = 130
