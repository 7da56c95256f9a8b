"""Writing files so that a crash never leaves a part of one under its name, and telling what
crashed runs left beside them from a live run's: shared by the outputs (media), the model cache
(engine) and the batch's records and report, which import nothing else in common."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
import time
from pathlib import Path

# A cache temporary whose writing process is gone from this machine is removed once it has been
# left this long: on a cache shared between machines a pid says nothing of another machine's
# writer, but no write stalls for a minute, and a kill -9 mid-write leaves the files for good.
_ABANDONED_SECONDS = 60.0


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def temporary_beside(path: Path) -> Path:
    """The name to write `path` under, unique to this thread, before renaming it into place (so
    that `path` is always whole); first, any temporaries of `path` that a killed run left go."""
    left = re.compile(rf"\.{re.escape(path.stem)}\.(\d+)\.\d+\.\w+")
    for old in path.parent.glob(f".{glob.escape(path.stem)}.*"):
        match = left.fullmatch(old.name)
        if match and not alive(int(match[1])):
            with contextlib.suppress(OSError):  # another run removed it first
                if time.time() - old.stat().st_mtime > _ABANDONED_SECONDS:
                    old.unlink()
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")


def write_atomically(path: Path, text: str, tmp: Path | None = None) -> None:
    """`path` holds `text` whole, or what it held before: never a part. `tmp`: the name it is
    written under first (default: beside it, this process's; the model cache gives
    temporary_beside's, as threads of one process may write the same file)."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
