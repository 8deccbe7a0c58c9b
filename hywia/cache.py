"""The on-disk cache: where it lives, content keys, atomic directory writes, and checksum manifests.

A cached result is named by `content_key` of everything that determines it, including
`code_digest()`: a digest of the whole package's source, so that editing any module that decides or
writes a result (there is no hand-kept list to forget one in) gives new keys.

Every directory the cache hands out was written to a temporary sibling first and renamed into
place only when complete, and carries a manifest of SHA-256 checksums. A directory without a
manifest, or whose files do not match it, is never accepted: it is moved aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from hywia import __version__

log = logging.getLogger(__name__)

MANIFEST_NAME = "hywia_manifest.json"
_HASH_CHUNK = 1 << 22
PACKAGE_DIR = Path(__file__).resolve().parent
# Code that cannot change a cached result: the CLI front ends, evaluation and client benchmarking.
_NOT_DECIDING = ("commands", "evaluation", "bench")


def code_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the path and bytes of every .py file of the package, except _NOT_DECIDING."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir)
        if relative.parts[0] not in _NOT_DECIDING:
            digest.update(f"{relative.as_posix()}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(package_dir: Path = PACKAGE_DIR) -> str:
    """The package version plus a short code digest, for reports."""
    return f"{__version__}+{code_digest(package_dir)[:12]}"


def content_key(fields: dict) -> str:
    """The SHA-256 of FIELDS (JSON-serialisable) in a canonical form: a cache entry's name."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`--cache-dir` wins, then `HYWIA_CACHE_DIR`, then `~/.cache/hywia`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HYWIA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hywia"


def sha256_file(path: Path, on_bytes=None) -> str:
    """SHA-256 of a file; ON_BYTES(n) is called after each block read (a progress bar's update)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def write_manifest(directory: Path) -> dict[str, str]:
    """Checksum every file in `directory` (recursively) into its manifest; returns the checksums."""
    checksums = {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    (directory / MANIFEST_NAME).write_text(json.dumps({"sha256": checksums}, indent=1, sort_keys=True))
    return checksums


def verify_manifest(directory: Path) -> str | None:
    """None when `directory` is complete and intact, else the reason it is not."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return f"{directory} has no {MANIFEST_NAME} (an interrupted or foreign write)"
    try:
        checksums = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for name, expected in checksums.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != expected:
            return f"{path} does not match its checksum (corrupted)"
    return None


def move_aside(directory: Path, reason: str) -> Path:
    """Keep a rejected cache entry for inspection instead of deleting a user's bytes."""
    target = directory.with_name(f"{directory.name}.rejected-{int(time.time())}")
    log.warning("cache entry %s rejected: %s; moved to %s and rebuilding", directory, reason, target)
    directory.rename(target)
    return target


@contextlib.contextmanager
def atomic_directory(final: Path, replace: bool = False):
    """Yield a temporary sibling directory; on success write its manifest and rename it to `final`.

    On any exception the temporary directory is removed; if the process is killed it stays behind
    under a `.tmp-` name that no loader accepts. With `replace`, an existing `final` is swapped out
    only after the new directory is complete; otherwise an existing `final` (a concurrent writer
    that finished first, with the same content key) wins and the new copy is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        write_manifest(staging)
        if final.exists() and replace:
            retired = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        elif final.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
