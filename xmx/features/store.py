"""The on-disk feature store: cached encoder outputs keyed by everything that changes the numbers.

One entry = one safetensors file ``<root>/<kind>/<digest>.safetensors`` where ``digest`` is the sha256 of the
canonical JSON of ``{"kind": kind, "key": key}``. The file carries its own provenance in the safetensors metadata:

- ``xmx.key``       the canonical key JSON (compared on every read: a hash collision or a renamed file is caught)
- ``xmx.checksum``  sha256 over the tensors (name, dtype, shape, bytes; names in sorted order)
- ``xmx.version``   the xmx version that wrote it, ``xmx.created`` the UTC creation time (ISO 8601)

Writes go to a temporary file in the same folder (``.<digest>.safetensors.<random>.tmp``), are fsynced and renamed
into place, so a reader sees the whole file or none. A per-key :class:`filelock.FileLock` (``<digest>.lock``) makes
sure that of several processes asking for the same key exactly one computes; the others wait and read its file.
Temporary files are only ever written under that lock, so whoever holds it may delete the leftovers of a killed
writer. Last use is recorded by touching a sidecar ``<digest>.used`` (its mtime), independent of atime.

Usage::

    store = FeatureStore("~/.cache/xmx/features")
    out = store.get_or_compute("image_features", key, lambda: {"features": feats})  # dict[str, Tensor]
    store.last_outcome  # "hit" | "miss" | "rebuilt"
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmx.errors import XmxError
from xmx.utils import apply_umask

log = logging.getLogger(__name__)

SCHEMA = "xmx.features/1"
SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 24 * 3600  # prune() removes temporary files older than this (a writer that was killed)


# ---- keys ---------------------------------------------------------------------------------------------------------
def canonical_json(obj) -> str:
    """The canonical JSON text of a key: sorted keys, no whitespace, ASCII, no NaN. Raises XmxError when the key
    holds something JSON cannot represent exactly (tensors, paths, sets, NaN)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise XmxError(f"feature store key is not plain JSON ({e}); use str/int/float/bool/None, lists and "
                       "dicts with string keys") from None


def key_digest(kind: str, key: Mapping) -> str:
    """sha256 hex of the canonical JSON of ``{"kind": kind, "key": key}``: the entry's file name."""
    return hashlib.sha256(_key_text(kind, key).encode("ascii")).hexdigest()


def _key_text(kind: str, key: Mapping) -> str:
    if not isinstance(kind, str) or not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise XmxError(f"feature store kind must be a non-empty name of letters, digits, '_' or '-', got {kind!r}")
    if not isinstance(key, Mapping):
        raise XmxError(f"feature store key must be a dict, got {type(key).__name__}")
    return canonical_json({"kind": kind, "key": dict(key)})


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, names in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            # a flat byte view of the contiguous CPU storage: hashlib reads it through the buffer protocol
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---- entries ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreEntry:
    kind: str
    key: dict
    path: Path
    size: int  # bytes on disk
    created: datetime  # UTC, from the file's metadata
    last_used: datetime  # UTC, from the `.used` sidecar (the creation time when it is missing)
    xmx_version: str


class CorruptEntry(Exception):
    """An entry file that must not be used (internal: the store logs it once and rebuilds)."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota" in text


class FeatureStore:
    """Cached tensors keyed by a JSON-able dict. ``verify=False`` skips the checksum on read (the key is always
    compared); ``lock_timeout`` seconds to wait for another process computing the same key (-1: forever)."""

    def __init__(self, root: str | os.PathLike, verify: bool = True, lock_timeout: float = -1):
        self.root = Path(root).expanduser()
        self.verify = verify
        self.lock_timeout = lock_timeout
        self.last_outcome: str | None = None  # "hit" | "miss" | "rebuilt" for the latest get_or_compute
        self.stats = {"hit": 0, "miss": 0, "rebuilt": 0}

    # ---- paths --------------------------------------------------------------------------------------------------
    def path_for(self, kind: str, key: Mapping) -> Path:
        return self.root / kind / f"{key_digest(kind, key)}{SUFFIX}"

    @staticmethod
    def _sidecar(path: Path, ext: str) -> Path:
        return path.with_name(path.name[: -len(SUFFIX)] + ext)

    def _lock(self, path: Path) -> FileLock:
        return FileLock(self._sidecar(path, ".lock"), timeout=self.lock_timeout)

    # ---- reading ------------------------------------------------------------------------------------------------
    def _read(self, path: Path, key_text: str | None, verify: bool) -> tuple[dict[str, torch.Tensor], dict]:
        """Load and check one file; raises CorruptEntry (with the reason) for anything unusable."""
        try:
            tensors = load_file(path)  # parses the header and checks it against the file size (truncation)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for malformed files
            raise CorruptEntry(f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if meta.get("xmx.schema") != SCHEMA:
            raise CorruptEntry(f"not an xmx feature file (schema {meta.get('xmx.schema')!r})")
        if key_text is not None and meta.get("xmx.key") != key_text:
            raise CorruptEntry("stored key differs from the requested key")
        if verify and tensors_checksum(tensors) != meta.get("xmx.checksum"):
            raise CorruptEntry("checksum mismatch (content altered or partly written)")
        return tensors, meta

    def load(self, kind: str, key: Mapping) -> dict[str, torch.Tensor] | None:
        """The stored tensors for ``key``, or None when absent or unusable (nothing is computed or logged)."""
        path = self.path_for(kind, key)
        try:
            return self._read(path, _key_text(kind, key), self.verify)[0]
        except (FileNotFoundError, CorruptEntry):
            return None

    def _touch_used(self, path: Path) -> None:
        used = self._sidecar(path, ".used")
        try:
            used.touch()
            os.utime(used)  # mtime = now, whatever the filesystem's atime policy
        except OSError:  # a read-only store still serves hits
            pass

    # ---- the one entry point ------------------------------------------------------------------------------------
    def get_or_compute(self, kind: str, key: Mapping,
                       compute: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors stored under ``(kind, key)``; on a miss (or a corrupt file) ``compute()`` runs once across
        all processes sharing ``root``, its result is written atomically and returned as stored (CPU, contiguous).
        The outcome is in ``self.last_outcome`` and logged at INFO."""
        key_text = _key_text(kind, key)
        path = self.root / kind / f"{hashlib.sha256(key_text.encode('ascii')).hexdigest()}{SUFFIX}"
        try:  # fast path: no lock for a hit
            tensors, _ = self._read(path, key_text, self.verify)
            return self._hit(kind, path, tensors)
        except (FileNotFoundError, CorruptEntry):
            pass
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise XmxError(f"feature store root {self.root} is not writable ({e.strerror}); point the feature "
                           "store at a writable folder") from None
        try:
            with self._lock(path):
                try:  # someone else may have written it while we waited
                    tensors, _ = self._read(path, key_text, self.verify)
                    return self._hit(kind, path, tensors)
                except FileNotFoundError:
                    outcome = "miss"
                except CorruptEntry as e:
                    log.warning("feature store: %s is corrupt (%s); removed and rebuilding", path, e)
                    path.unlink(missing_ok=True)
                    outcome = "rebuilt"
                self._remove_temp_files(path)  # leftovers of a writer that was killed (we hold the lock)
                t0 = time.perf_counter()
                tensors = self._validate(compute(), kind)
                self._write(path, tensors, key_text)
                self._touch_used(path)
        except Timeout:
            raise XmxError(f"feature store: waited {self.lock_timeout}s for the lock {self._sidecar(path, '.lock')}; "
                           "another process is computing this entry (or died holding it on a network filesystem)") from None
        self.last_outcome = outcome
        self.stats[outcome] += 1
        log.info("feature store %s: %s %s (%.1fs to compute)", outcome, kind, path.name, time.perf_counter() - t0)
        return tensors

    def _hit(self, kind: str, path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._touch_used(path)
        self.last_outcome = "hit"
        self.stats["hit"] += 1
        log.info("feature store hit: %s %s", kind, path.name)
        return tensors

    @staticmethod
    def _validate(result, kind: str) -> dict[str, torch.Tensor]:
        if not isinstance(result, Mapping) or not result:
            raise XmxError(f"feature store: compute for {kind!r} must return a non-empty dict of tensors, "
                           f"got {type(result).__name__}")
        out, seen = {}, set()
        for name, t in result.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise XmxError(f"feature store: compute for {kind!r} returned {name!r}: {type(t).__name__}; "
                               "expected str -> torch.Tensor")
            t = t.detach().to("cpu").contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[name] = t
        return out

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], key_text: str) -> None:
        import xmx
        meta = {"xmx.schema": SCHEMA, "xmx.key": key_text, "xmx.checksum": tensors_checksum(tensors),
                "xmx.version": xmx.__version__, "xmx.created": _utcnow().isoformat(timespec="seconds")}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            apply_umask(tmp)  # the user's umask, not mkstemp's 0600: a shared store is readable by the group
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, Exception) and _is_disk_full(e):
                raise XmxError(f"feature store: disk full while writing {path} "
                               f"({sum(t.nbytes for t in tensors.values()) / 2**20:.1f} MiB); free space or "
                               "point the feature store root at a larger disk") from None
            raise
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def _remove_temp_files(self, path: Path, older_than_s: float = 0.0) -> int:
        n, now = 0, time.time()
        for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
            try:
                if now - tmp.stat().st_mtime >= older_than_s:
                    tmp.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n

    # ---- housekeeping -------------------------------------------------------------------------------------------
    def _files(self):
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*/*{SUFFIX}") if not p.name.startswith("."))

    def entries(self) -> list[StoreEntry]:
        """Every readable entry (header only; no checksum): kind, key, size, created, last used."""
        out = []
        for p in self._files():
            try:
                with safe_open(p, framework="pt") as f:
                    meta = f.metadata() or {}
                ident = json.loads(meta["xmx.key"])
                created = datetime.fromisoformat(meta["xmx.created"])
                size = p.stat().st_size
            except Exception:  # noqa: BLE001 - unreadable files are verify_all()'s business
                continue
            used = self._sidecar(p, ".used")
            try:
                last_used = datetime.fromtimestamp(used.stat().st_mtime, timezone.utc)
            except FileNotFoundError:
                last_used = created
            out.append(StoreEntry(ident["kind"], ident["key"], p, size, created, last_used,
                                  meta.get("xmx.version", "")))
        return out

    def verify_all(self, remove: bool = False) -> list[tuple[Path, str]]:
        """Read every entry with its checksum; returns ``[(path, problem)]`` for the bad ones (removed when
        ``remove``), one log line each."""
        bad = []
        for p in self._files():
            try:
                tensors, meta = self._read(p, None, verify=True)
                if p.name != f"{hashlib.sha256(meta['xmx.key'].encode('ascii')).hexdigest()}{SUFFIX}":
                    raise CorruptEntry("file name does not match its stored key")
            except FileNotFoundError:
                continue
            except CorruptEntry as e:
                bad.append((p, str(e)))
                log.warning("feature store: %s is corrupt (%s)%s", p, e, "; removed" if remove else "")
                if remove:
                    with self._lock(p):
                        p.unlink(missing_ok=True)
        return bad

    def prune(self, older_than: datetime) -> list[Path]:
        """Remove entries not used since ``older_than`` (timezone-aware, or naive = local time) and temporary
        files older than a day; entries being written right now are skipped. Returns the removed entry paths."""
        if older_than.tzinfo is None:
            older_than = older_than.astimezone()
        removed = []
        for e in self.entries():
            if e.last_used >= older_than:
                continue
            lock = FileLock(self._sidecar(e.path, ".lock"), timeout=0)
            try:
                with lock:
                    used = self._sidecar(e.path, ".used")
                    if used.exists() and datetime.fromtimestamp(used.stat().st_mtime, timezone.utc) >= older_than:
                        continue  # used while we were looking
                    e.path.unlink(missing_ok=True)
                    used.unlink(missing_ok=True)
                    removed.append(e.path)
            except Timeout:
                continue
        for folder in (p for p in self.root.glob("*") if p.is_dir()) if self.root.is_dir() else []:
            now = time.time()
            for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
                try:
                    if now - tmp.stat().st_mtime > _STALE_TMP_S:
                        tmp.unlink()
                except FileNotFoundError:
                    pass
        log.info("feature store: pruned %d entries not used since %s", len(removed), older_than.isoformat())
        return removed
