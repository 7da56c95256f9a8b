"""What crashed runs leave beside the files they were writing, and how a later run tells them
from a live run's: shared by the outputs (media) and the model cache (engine), which import
nothing else in common."""

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
