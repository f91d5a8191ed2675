"""Benchmark: build the ImageNet train index (the file list of ``imagenet/images/train/<wnid>/``) on a synthetic,
ImageNet-shaped tree of empty files, the way ``xmx.data.coop`` reads it (one ``os.scandir`` per class folder, no
per-file stat). Target: under 10 s for the full 1,281,167 files.

    python bench/index_imagenet.py                      # 1000 folders, 1,281,167 empty files under a temp folder
    python bench/index_imagenet.py --files 100000       # scaled down (files spread over the 1000 folders)
    python bench/index_imagenet.py --smoke              # 20 folders x 50 files
    python bench/index_imagenet.py --root /fast/disk --keep --repeat 3
    python bench/index_imagenet.py --fingerprint        # + the data fingerprint of every file (xmx.data.fingerprint)

Prints one JSON object (and returns it from ``main``): folders, files, create_s, index_s (each repeat), items;
with ``--fingerprint`` also fingerprint_s: ``first`` (one stat + one sha256 per file: empty files here, so it times
the per-file overhead, not the disk: real images add their bytes / disk speed), ``cached`` (a later run in a new
process: one stat per file, the content digest read from the cache) and ``stat`` (``data.fingerprint=stat``).
Timings are with the directory entries in the page cache (the tree was just written); a cold-cache figure needs a
tree that has not been touched since boot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

IMAGENET_TRAIN_FILES = 1_281_167


def build_tree(train_dir: Path, wnids: list[str], total: int) -> float:
    """Write ``total`` empty files spread evenly over one folder per wnid; returns seconds taken."""
    t0 = time.perf_counter()
    per, extra = divmod(total, len(wnids))
    flags = os.O_CREAT | os.O_WRONLY
    for i, w in enumerate(wnids):
        d = train_dir / w
        d.mkdir(parents=True, exist_ok=True)
        base = f"{d}/{w}_"
        for j in range(per + (i < extra)):
            os.close(os.open(f"{base}{j}.JPEG", flags, 0o644))
    return time.perf_counter() - t0


def _time_fingerprint(root: Path, rel: list[str]) -> dict:
    from xmx.data import fingerprint as fp
    cache = root / "fingerprint-cache"
    out = {}
    for name, mode, clear in (("first", "content", True), ("cached", "content", True), ("stat", "stat", True)):
        if clear:
            fp._MEMO.clear()  # what a new process sees
        t0 = time.perf_counter()
        fp.fingerprint_files(root, rel, mode=mode, cache_dir=cache)
        out[name] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=IMAGENET_TRAIN_FILES, help="total files in the train tree")
    parser.add_argument("--folders", type=int, default=1000, help="class folders (at most 1000)")
    parser.add_argument("--smoke", action="store_true", help="20 folders x 50 files")
    parser.add_argument("--root", default=None, help="where to build the tree (default: a new temp folder)")
    parser.add_argument("--repeat", type=int, default=2, help="index builds to time")
    parser.add_argument("--keep", action="store_true", help="keep the tree afterwards")
    parser.add_argument("--fingerprint", action="store_true", help="also time the data fingerprint of all files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.folders, args.files = 20, 20 * 50

    from xmx.data import coop

    wnids = list(coop.shipped_wnids("imagenet"))[: args.folders]
    base = Path(tempfile.mkdtemp(prefix="xmx-bench-index-", dir=args.root))
    try:
        rel = "imagenet/images/train"
        create_s = build_tree(base / rel, wnids, args.files)
        times, items = [], []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            items, absent = coop.index_folders(base, rel, wnids, list(range(len(wnids))), wnids)
            times.append(round(time.perf_counter() - t0, 3))
            assert not absent, absent
        fingerprint_s = _time_fingerprint(base, [d.path for d in items]) if args.fingerprint else None
        result = {"bench": "index_imagenet", "fingerprint_s": fingerprint_s, "folders": len(wnids), "files": args.files, "items": len(items),
                  "create_s": round(create_s, 2), "index_s": times, "best_index_s": min(times),
                  "target_s": 10.0, "ok": len(items) == args.files and min(times) < 10.0,
                  "first": items[0].path if items else None, "host": platform.node(), "cpus": os.cpu_count(),
                  "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": "python bench/index_imagenet.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.keep:
        result["tree"] = str(base)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
