"""What exactly is in the image files a run reads: a fingerprint of their bytes, cheap to recompute.

A run's numbers depend on the bytes of its images, not on where they live. The fingerprint of a list of images
(paths relative to the ``$DATA`` root) is built in two steps:

1. **stat** (always): one ``os.stat`` per file (threads only where the filesystem is slow to answer) gives ``size``, ``mtime_ns``, ``ctime_ns``,
   inode and device. Their digest, with the real path of the root, names the exact state of these files on this
   machine: any write to a file (even one that puts its mtime back) changes its ctime, and another copy of the data
   has other inodes.
2. **content** (``mode="content"``, the default): sha256 of every file's bytes, combined with the relative paths into
   one digest. It is computed once per stat state and cached in ``<cache_dir>/<stat digest>.json``, so a second run
   costs only the stat pass; another copy with the same bytes gets the same content digest (the feature store shares
   its entries), one changed byte gives another.

``mode="stat"`` skips step 2 (no file is read): the digest of ``(path, size, mtime_ns)`` per file. Cheaper on a
first run over a huge set, still safe against another copy with other sizes or mtimes, but a file rewritten with its
mtime put back is not seen.

The fingerprint is part of every image feature key and of every job identity (``xmx.jobs.job_id``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from xmx.errors import XmxError

MODES = ("content", "stat")
VERSION = 1
_THREADS = 16  # stat/read are I/O: threads release the GIL (network filesystems gain most)
_PARALLEL_FROM = 2000  # below this, a plain loop is faster than a thread pool
_MEMO: dict[str, dict] = {}  # stat digest -> fingerprint, for this process


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise XmxError(f"data.fingerprint={mode!r}; valid choices: content (hash the bytes once, cached), "
                       "stat (size + mtime only)")
    return mode


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError as e:  # missing / no permission: part of the state (the readers report missing files)
        return (-1, 0, 0, 0, 0, type(e).__name__)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, "")


_PROBE = 512  # stats timed each way before choosing between a plain loop and threads


def _stat_all(paths: Sequence[str]) -> list:
    """One stat per file. A plain loop wins on a local disk (threads only add GIL hand-offs: 6x slower measured), a
    thread pool on a network filesystem (latency-bound): for long lists, 512 stats are timed each way and the
    faster way does the rest."""
    if len(paths) < 4 * _PROBE:
        return [_stat(p) for p in paths]
    t0 = time.perf_counter()
    out = [_stat(p) for p in paths[:_PROBE]]
    serial = time.perf_counter() - t0
    with ThreadPoolExecutor(_THREADS) as pool:
        t0 = time.perf_counter()
        out += list(pool.map(_stat, paths[_PROBE:2 * _PROBE], chunksize=32))
        threaded = time.perf_counter() - t0
        if threaded < 0.7 * serial:
            return out + list(pool.map(_stat, paths[2 * _PROBE:], chunksize=64))
    return out + [_stat(p) for p in paths[2 * _PROBE:]]


def _sha256_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            if hasattr(hashlib, "file_digest"):  # Python >= 3.11
                return hashlib.file_digest(f, "sha256").hexdigest()
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
    except OSError as e:
        return f"!{type(e).__name__}"  # an unreadable file has a state too; the extraction policy decides


def _map(fn, args: Sequence[str]) -> list:
    if len(args) < _PARALLEL_FROM:
        return [fn(a) for a in args]
    with ThreadPoolExecutor(min(_THREADS, (os.cpu_count() or 1) * 4)) as pool:  # reads + sha256 release the GIL
        return list(pool.map(fn, args, chunksize=64))


def fingerprint_files(root: str | os.PathLike, rel_paths: Sequence[str], *, mode: str = "content",
                      cache_dir: str | os.PathLike | None = None) -> dict:
    """``{"mode", "files", "bytes", "digest"}`` for the files ``rel_paths`` (POSIX, relative to ``root``).

    ``digest`` is the content digest (``mode="content"``) or the size + mtime digest (``mode="stat"``). With
    ``cache_dir``, content digests are cached on disk per stat state; in any case per process."""
    check_mode(mode)
    root = os.path.realpath(os.path.expanduser(str(root)))
    prefix = root.rstrip("/") + "/"
    paths = [p if p.startswith("/") else prefix + p for p in rel_paths]
    stats = _stat_all(paths)
    total = sum(st[0] for st in stats if st[0] > 0)
    if mode == "stat":
        light = hashlib.sha256("".join(f"{rel}\t{st[0]}\t{st[1]}\t{st[5]}\n"
                                       for rel, st in zip(rel_paths, stats)).encode())
        return {"mode": "stat", "files": len(paths), "bytes": total, "digest": light.hexdigest()}
    state = hashlib.sha256(f"xmx.fingerprint/{VERSION}\t{root}\n".encode())
    state.update("".join(f"{rel}\t{st[0]}\t{st[1]}\t{st[2]}\t{st[3]}\t{st[4]}\t{st[5]}\n"
                         for rel, st in zip(rel_paths, stats)).encode())
    state_digest = state.hexdigest()
    if state_digest in _MEMO:
        return dict(_MEMO[state_digest])
    cache = Path(cache_dir).expanduser() / f"{state_digest}.json" if cache_dir else None
    if cache is not None:
        try:
            found = json.loads(cache.read_text())
            if found.get("files") == len(paths) and found.get("mode") == "content":
                _MEMO[state_digest] = {k: found[k] for k in ("mode", "files", "bytes", "digest")}
                return dict(_MEMO[state_digest])
        except (OSError, ValueError, KeyError):
            pass
    t0 = time.perf_counter()
    hashes = _map(_sha256_file, paths)
    content = hashlib.sha256(f"xmx.content/{VERSION}\n".encode())
    for rel, h in zip(rel_paths, hashes):
        content.update(f"{rel}\t{h}\n".encode())
    out = {"mode": "content", "files": len(paths), "bytes": total, "digest": content.hexdigest()}
    _MEMO[state_digest] = out
    if cache is not None:
        _write_cache(cache, {**out, "root": root, "seconds": round(time.perf_counter() - t0, 3),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return dict(out)


def _write_cache(path: Path, record: dict) -> None:
    """Atomic and best effort: a read-only cache folder only costs the hashing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; collaborators on a shared cache read it too
        os.replace(tmp, path)
    except OSError:
        pass


def combine(parts: dict[str, dict]) -> dict:
    """One fingerprint for several named lists (e.g. a run's train / val / test sets)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(f"{name}\t{parts[name]['digest']}\n".encode())
    modes = {p["mode"] for p in parts.values()}
    return {"mode": modes.pop() if len(modes) == 1 else "mixed", "files": sum(p["files"] for p in parts.values()),
            "bytes": sum(p["bytes"] for p in parts.values()), "digest": h.hexdigest()}
