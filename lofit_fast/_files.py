"""Atomic file writes: a failed save leaves the previous file intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Union

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temps(directory: Path, names: Iterable[str]) -> None:
    """Delete what killed writes of these files left in `directory` (their temporary files)."""
    for name in names:
        for stale in directory.glob(f".{name}.*{TEMP_SUFFIX}"):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass


def atomic_write_files(contents: Dict[Path, bytes]) -> None:
    """Write every file to a temporary file in its own directory, then `os.replace` each into place.

    If anything fails before the replaces, every target keeps its previous content and no temporary file is
    left behind. The replaces themselves run last, one file after the other.
    """
    temps: Dict[Path, str] = {}
    mode = 0o666 & ~_umask()  # what open() would give the file; mkstemp's is 0600
    try:
        for target, data in contents.items():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_name_prefix(target), suffix=TEMP_SUFFIX)
            temps[target] = tmp
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str]) -> str:
    """Write one file atomically (creating its folder); returns the path."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({target: data.encode("utf-8") if isinstance(data, str) else data})
    return os.fspath(path)
