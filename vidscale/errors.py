"""The exception tree. Each class carries the exit status the CLI returns for it."""

import re

# OpenVINO's messages begin with where in its C++ sources they were raised, a line each.
_SOURCE_LOCATION = re.compile(r"Exception from \S+:\d+:")

# `vidscale batch` when some jobs failed (others may have succeeded); no exception carries it.
EXIT_SOME_FAILED = 6

# The fix named wherever a run ran out of memory.
MORE_MEMORY = "give the process more (ulimit -v, a container's limit) or use a smaller --tile"


class VidscaleError(Exception):
    """Base of every error vidscale raises on purpose; the message is one line for a person."""

    exit_status = 1


class UsageError(VidscaleError):
    """Arguments or settings that cannot work together."""

    exit_status = 2


class ModelError(VidscaleError):
    """Unknown model name, unreadable or unsafe weight file, unsupported architecture."""

    exit_status = 3


class EngineError(VidscaleError):
    """OpenVINO could not convert, compile or run a model (missing device, wrong shape)."""

    exit_status = 4


class MediaError(VidscaleError):
    """An input or output file that cannot be read or written as asked."""

    exit_status = 5


class OutputClosedError(MediaError):
    """The process reading our output (stdout) went away; the run stops quietly."""

    # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe.
    exit_status = 141


def first_line(exc: BaseException | str) -> str:
    """The first line of what a library's exception (or its text) says went wrong, for a one-line
    message."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not _SOURCE_LOCATION.fullmatch(line):
            return line
    return type(exc).__name__
