"""Files written for the user, and interrupts that must stop work rather than change it.

* :func:`atomic_path`: every output file (ONNX, ``.pt2``, state_dicts) is written to a
  temporary file in the target's folder and moved onto the target with ``os.replace`` only when
  complete. A full disk, an error or Ctrl-C midway leaves the previous file (or none) at the
  target, never a truncated one.
* :func:`watch_interrupts`: Ctrl-C inside a library that turns exceptions into its own errors
  (``torch.export`` wraps what it catches) must not read as "this exporter cannot capture the
  model" and send the work down a fallback path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["atomic_path", "atomic_write", "watch_interrupts", "raise_if_interrupted"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block completes, move it onto
    ``path`` (``os.replace``: atomic on one file system). On any exception, Ctrl-C included,
    the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1]  # writers that check the extension (.pt2) see theirs
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}{ext}",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(path):  # keep the target's permission bits, as an overwrite would
            with contextlib.suppress(OSError):
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            with contextlib.suppress(OSError):
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then move the result onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


class _Interrupts(threading.local):
    seen: bool = False


_STATE = _Interrupts()


@contextlib.contextmanager
def watch_interrupts() -> Iterator[None]:
    """Remember whether SIGINT arrived during the block (main thread only: Python delivers
    signals there). The previous handler still runs, so Ctrl-C raises as usual; this only
    records it for :func:`raise_if_interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN / SIG_DFL / set from C: leave it alone
        yield
        return

    def handler(signum: int, frame: Any) -> Any:
        _STATE.seen = True
        return previous(signum, frame)

    _STATE.seen = False
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def raise_if_interrupted(e: BaseException) -> None:
    """Re-raise as ``KeyboardInterrupt`` when ``e`` is (or was caused by) an interrupt: a
    ``KeyboardInterrupt`` in its cause/context chain, or SIGINT seen by
    :func:`watch_interrupts`."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    if _STATE.seen:
        _STATE.seen = False
        raise KeyboardInterrupt from e


def check_writable(path: str) -> None:
    """Refuse a path that cannot be written before any work (a directory, a missing or
    read-only folder)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name such as {path}/model.onnx")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{path} is not writable")
