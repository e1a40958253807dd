"""Where this process's metrics go, set up before any metric exists (see ``metrics``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from email_service.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_directory(settings: Settings) -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this process and its children, and drop dead processes' files.

    The embedded default keeps it under its data directory; elsewhere the environment names it
    (an ``emptyDir`` in Kubernetes) or a private temporary directory is made. Must run before
    ``metrics`` is imported.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
    elif settings.embedded_postgres or settings.embedded_redis:
        directory = settings.data_dir / "metrics"
    else:
        directory = Path(tempfile.mkdtemp(prefix="email-service-metrics-"))
        atexit.register(_remove_own, directory, os.getpid())
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    _remove_dead_files(directory)
    return directory


def _remove_dead_files(directory: Path) -> None:
    """Files of processes that are gone (an earlier run, a crash); the live ones are other commands'."""
    for path in directory.glob("*.db"):
        owner = path.stem.rsplit("_", 1)[-1].removesuffix("-job")
        if owner.isdigit() and not _alive(int(owner)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_own(directory: Path, creator: int) -> None:
    """The temporary directory goes with the command that made it (not with a fork of it)."""
    if os.getpid() == creator:
        shutil.rmtree(directory, ignore_errors=True)
