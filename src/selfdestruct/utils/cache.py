"""A build-once cache for expensive stages (pre-training, alignment), keyed by the config that made them.

Two jobs racing for the same entry (a sweep on several GPUs) must neither corrupt it nor build it
twice: the first takes an exclusive file lock and builds into a staging directory that is renamed
into place when complete; the others wait on the lock and then find it done.

A build killed outright (kill -9, a pre-empted node) leaves no entry: its staging directory and its stage
checkpoints live in the entry's work directory (``.<hash>.work`` beside it). The next build of the same key
holds the lock, so whatever staging directory it finds there is a dead build's: it is removed, while the
checkpoints are kept for the stage to resume from (:func:`work_dir`). Publishing the entry removes the work
directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfdestruct.utils.io import publish_dir

log = logging.getLogger(__name__)
DONE_MARKER = "COMPLETE"


def default_cache_root() -> Path:
    """``$SELFDESTRUCT_CACHE`` or ``~/.cache/selfdestruct``."""
    env = os.environ.get("SELFDESTRUCT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfdestruct"


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able description of what an entry was built from."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def entry_dir(root: Path, kind: str, key_obj: Any) -> Path:
    return Path(root) / kind / config_key(key_obj)


def work_dir(root: Path, kind: str, key_obj: Any) -> Path:
    """A stable per-entry directory that survives an interrupted build (stage checkpoints go in it)."""
    final = entry_dir(root, kind, key_obj)
    return final.with_name(f".{final.name}.work")


def _remove_dead_builds(final: Path, work: Path) -> None:
    """Staging directories of builds that died without cleaning up (called with the entry's lock held)."""
    stale = [work / "staging", *final.parent.glob(f".{final.name}.*.tmp")]
    for path in stale:
        if path.exists():
            log.info("removing the staging directory of an interrupted build: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def cached_dir(root: Path, kind: str, key_obj: Any, build: Callable[[Path], None]) -> Path:
    """Return ``root/kind/<hash>``, calling ``build(staging_dir)`` first if no complete entry exists."""
    final = entry_dir(root, kind, key_obj)
    if (final / DONE_MARKER).exists():
        log.info("cache hit: %s %s", kind, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why nothing moves: another job is building this entry
            log.info("waiting for another job building %s into %s", kind, final)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / DONE_MARKER).exists():  # another job built it while we waited
            log.info("cache hit after waiting: %s %s", kind, final)
            return final
        log.info("building %s into %s", kind, final)
        work = work_dir(root, kind, key_obj)
        _remove_dead_builds(final, work)
        tmp = work / "staging"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps(key_obj, sort_keys=True, indent=2, default=str))
            (tmp / DONE_MARKER).write_text("")
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the stage checkpoints stay in the work directory
            raise
        shutil.rmtree(work, ignore_errors=True)
    return final
