"""The one way gkd writes a folder a user keeps: refuse to clobber what is there, write everything under a hidden
sibling, and rename it into place only when it is complete. An interrupted or failed write leaves no folder that looks
finished; the previous folder is replaced only by a complete new one, and only moved aside (`<name>.replaced-N`),
never deleted."""

import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)


def check_output(output_dir: str | Path, inputs=(), flag: str = "--output_dir", replaces: bool = True) -> Path:
    """The one check every command makes of a folder it writes (train, merge, prune, the teacher cache, compare, eval),
    before anything loads; writes nothing. The folder is not a file and can be written; it is none of the command's
    `inputs` (model folders, data, caches), lies inside none of them (what it writes would be read as part of one), and,
    when the command may move it aside (`replaces`), holds none; and no other gkd process holds its lock."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{flag} {output_dir} is a file, not a folder")
    check_not_an_input(output_dir, inputs, flag, replaces)
    check_writable(output_dir, flag)
    check_not_busy(output_dir)
    return output_dir


def check_output_folder(output_dir: str | Path, overwrite: bool, inputs: list[str | Path] = ()) -> Path:
    """`check_output`, and refuse a folder that is not empty unless `overwrite` (a tool's output is replaced whole)."""
    output_dir = check_output(output_dir, inputs)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output_dir} is not empty; pass --overwrite to move it aside and replace it")
    return output_dir


# A folder holding one of these is read by name (a model, an adapter, a teacher cache): a folder written inside it is
# never read as part of it, as it would be inside a data folder, which reads every file below it.
READ_BY_NAME = ("config.json", "adapter_config.json", "cache.json")


def check_not_an_input(output_dir: str | Path, inputs, flag: str, replaces: bool = True) -> None:
    """Refuse an output folder that is one of the inputs (model folders, data, caches), lies inside an input folder
    read whole (a data folder reads every file below it: a cache or a run written there would become data), or, when
    `replaces`, holds one: moving it aside or clearing it would take the input with it."""
    target = Path(output_dir).resolve()
    for name in inputs:
        if not name or not Path(name).expanduser().exists():
            continue  # a Hub id, or nothing given
        source = Path(name).expanduser().resolve()
        if source == target or (replaces and target in source.parents):
            raise ConfigError(f"{flag} {output_dir} would replace the input {name}; choose another folder")
        read_by_name = any((source / name).is_file() for name in READ_BY_NAME)
        if source.is_dir() and source in target.parents and not read_by_name:
            raise ConfigError(f"{flag} {output_dir} lies inside the input folder {name}: what is written there would "
                              "be read as part of it; choose a folder outside it")


def check_writable(folder: str | Path, flag: str) -> None:
    """The folder, or the nearest of its parents that exists, must be a folder this process can write in."""
    target = Path(folder).resolve()
    existing = next(parent for parent in [target, *target.parents] if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot write {flag} {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {flag} {folder}: permission denied in {existing}")


@contextmanager
def staged_folder(output_dir: str | Path, overwrite: bool, purpose: str = "writing"):
    """Yield an empty hidden sibling of `output_dir`; on success move it into place (replacing an old folder only now,
    and only with `overwrite`), on any failure or interruption remove it and any parents it created."""
    output_dir = Path(output_dir)
    created: list[Path] = []
    try:
        created = _make_parents(output_dir.parent)
        staging = output_dir.parent / f".{output_dir.name}.{purpose}-{os.getpid()}-{secrets.token_hex(3)}"
        staging.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise ConfigError(f"cannot write output_dir {output_dir}: {error.strerror or error}") from None
    try:
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first) so that a failure can remove them again."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass


def _apply_umask(folder: Path) -> None:
    """Give the written files the permissions of any new file: safetensors writes 0600, which a server running as
    another user (a vLLM container, say) cannot read, and mkdtemp-style folders are private."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    _apply_umask(staging)
    if not output_dir.exists():
        try:
            staging.rename(output_dir)
            return
        except OSError:
            if not output_dir.exists():
                raise
    if any(output_dir.iterdir()) and not overwrite:  # filled while we were writing
        raise ConfigError(f"output_dir {output_dir} is not empty; pass --overwrite to replace it")
    check_not_busy(output_dir)  # a run that started in it while we were writing
    old = move_aside(output_dir, "replaced")
    try:
        staging.rename(output_dir)
    except BaseException:
        old.rename(output_dir)
        raise
    logger.warning("--overwrite: moved the previous %s to %s (delete it when you no longer need it)", output_dir, old)


def move_aside(folder: Path, reason: str) -> Path:
    """Rename `folder` to a free sibling `<name>.<reason>-<n>`, where its owner can still find it; returns the path."""
    folder = Path(folder)
    for number in range(1, 10_000):
        aside = folder.with_name(f"{folder.name}.{reason}-{number}")
        if not aside.exists():
            folder.rename(aside)
            return aside
    raise ConfigError(f"{folder}: too many {folder.name}.{reason}-N folders beside it; delete some")


LOCK_FILE = ".gkd-run.lock"
_held_locks = []  # open lock files of this process: closing one releases its lock


def check_not_busy(output_dir: str | Path) -> None:
    """Refuse at once a folder another gkd process holds (before anything reads its checkpoints); writes nothing. The
    probe is a shared lock: it fails only against a holder's exclusive one, so ranks probing together pass."""
    path = Path(output_dir) / LOCK_FILE
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            _refuse_busy(path.parent, handle)
        except OSError:
            return
        fcntl.flock(handle, fcntl.LOCK_UN)


def lock_folder(folder: Path):
    """An exclusive lock on `folder` for this process's lifetime (or until `release_lock`); the kernel drops it when
    the process dies, so a crashed run never blocks the next. Refuses a folder another process holds."""
    path = folder / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with handle:
            _refuse_busy(folder, handle)
    except OSError as error:  # a filesystem without locks (some network mounts): run unguarded, and say so
        logger.warning("cannot lock %s (%s): nothing stops a second run from writing into it", path, error)
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held_locks.append(handle)
    return handle


def _refuse_busy(folder: Path, handle) -> None:
    """The one refusal of a locked folder, naming the holder its lock file records."""
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    raise ConfigError(f"{folder} is in use by another gkd process ({holder}); wait for it to end or choose another "
                      "--output_dir") from None


def release_lock(handle) -> None:
    if handle in _held_locks:
        _held_locks.remove(handle)
    handle.close()
