"""Small shared helpers: atomic writes (with the user's umask), CPU threads, provenance (code and package versions).

Nothing here imports torch at module level: the command line answers ``--help`` and config errors without it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by ``tempfile`` (always 0600, or 0700 for a folder) the mode a plain ``open``/``mkdir`` would
    have had, so collaborators sharing the storage can read what a run wrote."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place: readers see all or nothing.
    The file gets the user's umask (not ``tempfile``'s 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        apply_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


PACKAGES = ("torch", "torchvision", "open_clip_torch", "lightning", "hydra-core", "omegaconf", "transformers",
            "torchmetrics", "safetensors", "numpy", "pillow")


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def code_version() -> dict:
    """xmx's version and, from a git checkout, the commit and whether the tree had uncommitted changes."""
    import xmx
    info = {"xmx": xmx.__version__, "git_commit": None, "git_dirty": None}
    src = Path(xmx.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


# ---- CPU threads ---------------------------------------------------------------------------------------------------
_USER_OMP = os.environ.get("OMP_NUM_THREADS")  # read before any run sets it: the user's own request
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, SLURM)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def plan_threads(threads, workers: int, cores: int | None = None) -> tuple[int, int]:
    """-> (intra-op threads, DataLoader workers) with ``workers x threads <= cores``: workers are capped at the
    cores, and ``threads: auto`` takes the cores each worker leaves (all of them without workers). An explicit
    ``threads`` (or ``OMP_NUM_THREADS`` set by the user) is kept, and the workers shrink to fit it."""
    cores = cores or usable_cores()
    workers = max(0, min(int(workers), cores))
    if threads in (None, "auto"):
        env = _USER_OMP
        threads = int(env) if env and env.isdigit() and int(env) > 0 else max(1, cores // max(1, workers))
    threads = max(1, min(int(threads), cores))
    workers = min(workers, cores // threads)
    return threads, workers


def set_thread_env(threads: int) -> None:
    """Thread-count variables for OpenMP/BLAS pools that read them when they load (numpy/scipy/torch imported
    later, and child processes)."""
    for k in _THREAD_ENV:
        os.environ[k] = str(threads)


def apply_threads(threads: int) -> None:
    """Set the intra-op thread pools of every library already loaded (torch, and BLAS/OpenMP via threadpoolctl)."""
    set_thread_env(threads)
    import sys
    if "torch" in sys.modules:
        import torch
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


# ---- progress of long steps ----------------------------------------------------------------------------------------
class Heartbeat:
    """A log line at most every ``every_s`` seconds for a long loop without a progress bar (searches, solver
    fits): ``what: done/total (elapsed, ~remaining)``. Silent for loops that finish within ``every_s``.

        beat = Heartbeat("alpha/beta search", total=n)
        for i in range(n):
            ...
            beat(i + 1)
    """

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0, logger=None):
        import logging
        import time
        self.what, self.total, self.every_s = what, total, every_s
        self.log = logger or logging.getLogger("xmx")
        self._clock = time.monotonic
        self.t0 = self._last = self._clock()

    def __call__(self, done: int, note: str = "") -> None:
        now = self._clock()
        if now - self._last < self.every_s:
            return
        self._last = now
        el = now - self.t0
        eta = f", ~{el * (self.total - done) / done:.0f}s left" if self.total and done else ""
        of = f"/{self.total}" if self.total else ""
        self.log.info("%s: %d%s (%.0fs%s)%s", self.what, done, of, el, eta, f" {note}" if note else "")

    def during(self, note: str = "running"):
        """A context manager for one opaque call (a solver fit inside a library): a background thread logs
        ``what: note (Ns)`` every ``every_s`` seconds until the call returns."""
        import contextlib
        import threading

        @contextlib.contextmanager
        def _alive():
            stop = threading.Event()
            t0 = self._clock()

            def tick():
                while not stop.wait(self.every_s):
                    self.log.info("%s: %s (%.0fs)", self.what, note, self._clock() - t0)

            th = threading.Thread(target=tick, name="xmx-heartbeat", daemon=True)
            th.start()
            try:
                yield self
            finally:
                stop.set()
                th.join()

        return _alive()


# ---- one message once, and only those that matter -----------------------------------------------------------------
_NOISE = ("litlogger", "LitLogger",  # Lightning's advert for its cloud logger
          "`weights_only` was not set")  # Lightning loading xmx's own checkpoints, on every load


class _Quiet:
    """A logging filter: drops Lightning's litlogger advert and open_clip's step-by-step INFO lines (logged on the
    root logger: "Parsing model identifier", "Loaded built-in ... config", ...); warnings and errors always pass."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        if any(n in msg for n in _NOISE):
            return False
        if record.levelno < 30 and record.name == "root" and "open_clip" in (record.pathname or ""):
            return False
        return True


def quiet_logs() -> None:
    """Each message once, and only those that matter: Lightning's own console handler is removed (its INFO lines
    reach the run's handlers through propagation: they were printed twice), the litlogger advert and open_clip's
    INFO chatter are filtered, and two warnings that are no news for xmx are silenced: "Found N module(s) in eval
    mode" (the frozen encoders are in eval mode by design) and Lightning's own deprecation of ``LeafSpec``."""
    import logging
    import warnings
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    quiet = _Quiet()
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _Quiet) for f in h.filters):
            h.addFilter(quiet)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
