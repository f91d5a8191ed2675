"""``python -m xmx.data get <dataset ...|all> --root $DATA``: fetch the CoOp datasets into CoOp's layout.

For each dataset the sources of :mod:`xmx.data.sources` are tried in order (Hub mirror, torchvision's sources, the
original URLs) until one gives a complete tree:

1. every file is downloaded with ``huggingface_hub``'s resumable ``http_get`` into ``<name>.part`` under
   ``$DATA/.xmx-get/<dataset>/downloads/`` (Hub files located with ``hf_hub_url`` / ``get_hf_file_metadata``, which
   honour ``HF_ENDPOINT``), resumed where it stopped when ``get`` runs again, with a progress bar; Google Drive files
   through torchvision's helper. Each is checked against the checksum its source publishes (the Hub's LFS sha256,
   torchvision's md5): a mismatch deletes the file and names both hashes;
2. archives are unpacked into a staging folder under ``$DATA/.xmx-get/`` (never into ``$DATA/<dir>/`` itself);
3. the staged tree is verified with the checker (:func:`xmx.data.check.check_dataset`): every image the split files
   list is present and the split / class counts are the published ones; a missing image is named;
4. a manifest ``xmx_manifest.json`` (source, revision, every file's sha256, the verified counts) is written into it
   and the folder is renamed into place last, so a half-unpacked tree never sits at ``$DATA/<dir>/``.

A dataset that is already complete is left alone (nothing fetched). When every source fails (offline, hosts down)
one line says what to download by hand and where to put it. ImageNet-1k is not redistributable:
``get imagenet`` explains where to obtain it and, with ``--from <folder with the ILSVRC2012 tars>``, builds
``imagenet/images/{train,val}/<wnid>/`` and ``classnames.txt`` (validation labels from the devkit).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

from xmx.data import coop
from xmx.data.datasets import DATASETS, get_info
from xmx.data.sources import IMAGENET_HELP, DatasetSources, Recipe, Remote, catalog
from xmx.errors import XmxError

MANIFEST = "xmx_manifest.json"
WORK = ".xmx-get"


class SourceError(Exception):
    """One source of one dataset failed (download, checksum, unpack or verification); the next is tried."""


def file_hash(path: str | os.PathLike, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sums(path: Path, remote: Remote, where: str) -> None:
    for algo, want in (("md5", remote.md5), ("sha256", remote.sha256)):
        if want:
            got = file_hash(path, algo)
            if got != want.lower():
                path.unlink(missing_ok=True)
                raise SourceError(f"{remote.name} from {where}: {algo} {got} differs from the published {want}; "
                                  "the file was deleted (a changed or corrupted source)")


# ---- downloads ------------------------------------------------------------------------------------------------
def fetch(remote: Remote, downloads: Path) -> tuple[Path, dict]:
    """Download ``remote`` (resuming a partial download) and check it; returns its path and its manifest row."""
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        if remote.kind == "hub":
            return _fetch_hub(remote, downloads)
        if remote.kind == "url":
            return _fetch_url(remote, downloads)
        if remote.kind == "gdrive":
            return _fetch_gdrive(remote, downloads)
    except SourceError:
        raise
    except Exception as e:  # network, HTTP status, offline mode, missing gdown: this source is unavailable
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise SourceError(f"{remote.name} from {remote.describe()}: {type(e).__name__}: {msg}") from None
    raise SourceError(f"{remote.name}: unknown source kind {remote.kind!r}")


def _fetch_url(remote: Remote, downloads: Path) -> tuple[Path, dict]:
    from huggingface_hub.file_download import http_get
    final = downloads / remote.name
    part = downloads / (remote.name + ".part")
    if not final.is_file():
        resume = part.stat().st_size if part.is_file() else 0
        try:
            with open(part, "ab") as f:
                http_get(remote.url, f, resume_size=resume, displayed_filename=remote.name)
        finally:
            if part.is_file() and part.stat().st_size == 0:
                part.unlink()  # nothing received: no partial file to resume
        os.replace(part, final)
    _check_sums(final, remote, remote.url)
    return final, {"name": remote.name, "url": remote.url, "bytes": final.stat().st_size,
                   "md5": remote.md5, "sha256": file_hash(final)}


def _fetch_gdrive(remote: Remote, downloads: Path) -> tuple[Path, dict]:
    from torchvision.datasets.utils import download_file_from_google_drive
    final = downloads / remote.name
    download_file_from_google_drive(remote.file_id, str(downloads), remote.name, remote.md5)
    _check_sums(final, remote, remote.describe())
    return final, {"name": remote.name, "url": remote.describe(), "bytes": final.stat().st_size,
                   "sha256": file_hash(final)}


def _fetch_hub(remote: Remote, downloads: Path) -> tuple[Path, dict]:
    """A Hub file through huggingface_hub: ``hf_hub_url`` + ``get_hf_file_metadata`` (commit, the LFS sha256 the
    Hub publishes as the ETag, the size; ``HF_ENDPOINT`` honoured) and its resumable ``http_get`` into our own
    ``<name>.part``. (``hf_hub_download`` resumes only within one call: it downloads into a fresh per-process file,
    so a killed download of a 30 GB zip would start again from zero.)"""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(remote.repo, remote.path, repo_type=remote.repo_type, revision=remote.revision,
                     endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    etag = (meta.etag or "").strip('"')
    published = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    final = downloads / remote.name
    part = downloads / (remote.name + ".part")
    if final.is_file() and published and file_hash(final) != published:
        final.unlink()  # a finished download of another version of the file
    if not final.is_file():
        resume = part.stat().st_size if part.is_file() else 0
        if meta.size is not None and resume > meta.size:
            part.unlink()
            resume = 0
        try:
            with open(part, "ab") as f:
                http_get(meta.location, f, resume_size=resume, expected_size=meta.size,
                         displayed_filename=remote.name)
        finally:
            if part.is_file() and part.stat().st_size == 0:
                part.unlink()
        os.replace(part, final)
    sha = file_hash(final)
    for want, what in ((published, "the Hub's LFS sha256"), (remote.sha256, "the pinned sha256")):
        if want and sha != want:
            final.unlink(missing_ok=True)
            raise SourceError(f"{remote.name} from {remote.describe()}: sha256 {sha} differs from {what} {want}; "
                              "the file was deleted (a changed or corrupted source)")
    return final, {"name": remote.name, "repo": remote.repo, "repo_type": remote.repo_type, "path": remote.path,
                   "revision": meta.commit_hash or remote.revision, "bytes": final.stat().st_size, "sha256": sha}


def prune_empty(top: Path) -> None:
    """Remove empty folders under (and including) ``top``: failed attempts leave only resumable partial files."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        top.rmdir()
    except OSError:
        pass


# ---- unpack, verify, install ----------------------------------------------------------------------------------
def extract(archive: Path, to: Path) -> None:
    from torchvision.datasets.utils import extract_archive
    to.mkdir(parents=True, exist_ok=True)
    try:
        extract_archive(str(archive), str(to))
    except (tarfile.TarError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise SourceError(f"{archive.name}: cannot unpack ({type(e).__name__}: {e})") from None


def _marker(name: str) -> str:
    info = DATASETS[name]
    if name == "fgvc_aircraft":
        return "variants.txt"
    if name == "stanford_cars":
        return "cars_train"
    return info.extra["image_dir"]


def find_root(stage: Path, name: str, depth: int = 3) -> Path:
    """The shallowest folder under ``stage`` that holds the dataset's marker (its image folder)."""
    level = [stage]
    for _ in range(depth + 1):
        for d in level:
            if (d / _marker(name)).exists():
                return d
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and c.name != "__MACOSX")
    raise SourceError(f"{name}: the unpacked files hold no {_marker(name)}/ (expected CoOp layout "
                      f"$DATA/{DATASETS[name].extra['layout']})")


def verify(name: str, parent: Path) -> dict:
    """Check ``parent/<dir>`` with the checker; raise :class:`SourceError` naming what is missing or wrong."""
    from xmx.data.check import check_dataset
    r = check_dataset(name, parent)
    if r["status"] != "found":
        raise SourceError(f"{name}: verification failed: {r['message']}")
    return {k: r[k] for k in ("train", "val", "test", "classes")}


def install(name: str, root: Path, recipe: Recipe, keep_downloads: bool = False, replace_existing: bool = False
            ) -> dict:
    """Fetch, unpack, verify and move ``name`` into ``root/<dir>`` from one source; returns the manifest. On failure
    the staged files are removed (downloads stay, to be resumed or reused) and :class:`SourceError` is raised."""
    work = root / WORK / name
    try:
        return _install(name, root, recipe, work, keep_downloads, replace_existing)
    finally:
        for d in ("stage", "verified"):
            shutil.rmtree(work / d, ignore_errors=True)
        prune_empty(root / WORK)


def _install(name: str, root: Path, recipe: Recipe, work: Path, keep_downloads: bool, replace_existing: bool) -> dict:
    info = get_info(name)
    stage, done = work / "stage", work / "verified"
    for d in (stage, done):
        shutil.rmtree(d, ignore_errors=True)
    stage.mkdir(parents=True)
    files, plain = [], []
    for remote in recipe.files:
        path, row = fetch(remote, work / "downloads" / recipe.kind)
        files.append(row)
        if remote.unpack is None:
            plain.append((path, remote.dest))
        else:
            extract(path, stage / remote.unpack)
    ds = stage / recipe.root if recipe.root else find_root(stage, name)
    if not ds.is_dir():
        raise SourceError(f"{name}: the unpacked files hold no {recipe.root}/")
    for nested in recipe.nested:
        if not (ds / nested).is_file():
            raise SourceError(f"{name}: the unpacked files hold no {nested}")
        extract(ds / nested, ds)
        (ds / nested).unlink()
    for src, dst in recipe.moves:
        if not (ds / src).exists():
            raise SourceError(f"{name}: the unpacked files hold no {src}/ to rename to {dst}/")
        os.rename(ds / src, ds / dst)
    for path, dest in plain:
        shutil.copyfile(path, ds / dest)
    done.mkdir(parents=True)
    os.rename(ds, done / info.dir)
    counts = verify(name, done)
    commit = next((f["revision"] for f in files if "revision" in f), None)
    manifest = {"dataset": name, "source": recipe.label, "kind": recipe.kind, "revision": commit,
                "files": files, "verified": counts,
                "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "by": "python -m xmx.data get"}
    (done / info.dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = root / info.dir
    if final.exists():
        if not replace_existing:
            raise SourceError(f"{final} appeared while fetching; left as it is")
        trash = work / "replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(done / info.dir, final)  # last step: the complete, verified tree appears at once
    if not keep_downloads:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# ---- ImageNet-1k from the ILSVRC2012 archives -------------------------------------------------------------------
def _devkit_labels(devkit: Path, tmp: Path) -> list[str]:
    """Validation wnids in file order, from the devkit's ``data/meta.mat`` (ILSVRC2012_ID -> WNID of the leaf
    synsets) and ``data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID a line). torchvision's
    ``parse_devkit_archive`` reads the same two files but insists on the original archive's md5 and writes into the
    archive folder, so it is not reused."""
    import scipy.io as sio
    extract(devkit, tmp)
    roots = [p.parent for p in tmp.rglob("meta.mat") if p.parent.name == "data"]
    if not roots:
        raise XmxError(f"--from: {devkit} holds no data/meta.mat; is it ILSVRC2012_devkit_t12.tar.gz?")
    data = roots[0]
    syn = sio.loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
    idx_to_wnid = {int(s[0]): str(s[1]) for s in syn if int(s[4]) == 0}
    gt = (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return [idx_to_wnid[int(i)] for i in gt]


def build_imagenet(src: Path, root: Path, check_md5: bool = True) -> dict:
    """``imagenet/images/train/<wnid>/`` from ILSVRC2012_img_train.tar (one tar per class inside),
    ``imagenet/images/val/<wnid>/`` from ILSVRC2012_img_val.tar + the devkit's labels, and ``classnames.txt``
    (``<wnid> <name>``, the CLIP class names open_clip ships, as in CoOp's file). Staged, then moved into place."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    paths = {k: src / f for k, (f, _) in ARCHIVE_META.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise XmxError(f"--from {src}: {', '.join(missing)} not found; put the three ILSVRC2012 files there "
                       "(see python -m xmx.data get imagenet)")
    if check_md5:
        for k, (f, md5) in ARCHIVE_META.items():
            got = file_hash(paths[k], "md5")
            if got != md5:
                raise XmxError(f"--from: {f} has md5 {got}, not the published {md5} (a damaged or different file); "
                               "download it again, or pass --no-md5 for a re-packed copy")
    work = root / WORK / "imagenet"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "imagenet"
    train, val = out / "images" / "train", out / "images" / "val"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    val_wnids = _devkit_labels(paths["devkit"], work / "devkit")
    extract(paths["train"], work / "train_tars")
    for t in sorted((work / "train_tars").glob("*.tar")):
        extract(t, train / t.stem)
        t.unlink()
    extract(paths["val"], work / "val_flat")
    images = sorted(p for p in (work / "val_flat").rglob("*.JPEG"))
    if len(images) != len(val_wnids):
        raise XmxError(f"--from: {paths['val'].name} holds {len(images)} images but the devkit labels "
                       f"{len(val_wnids)}; are the archives from the same release?")
    for img, wnid in zip(images, val_wnids):
        (val / wnid).mkdir(exist_ok=True)
        os.rename(img, val / wnid / img.name)
    names = dict(zip(coop.shipped_wnids("imagenet"), coop.open_clip_imagenet_classnames()))
    (out / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    n_train = sum(1 for _ in train.rglob("*") if _.is_file())
    manifest = {"dataset": "imagenet", "source": f"local:{src}", "kind": "local", "revision": None,
                "files": [{"name": p.name, "bytes": p.stat().st_size, "md5": file_hash(p, "md5") if check_md5 else None}
                          for p in paths.values()],
                "verified": {"train": n_train, "val": 0, "test": len(images),
                             "classes": len(list(train.iterdir()))},
                "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "by": "python -m xmx.data get imagenet --from"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = root / "imagenet"
    if final.exists():
        raise XmxError(f"{final} exists; move it away first")
    os.rename(out, final)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


# ---- command line -----------------------------------------------------------------------------------------------
GETTABLE = tuple(n for n in coop.COOP_DATASETS)


def get_one(name: str, root: Path, sources: DatasetSources, keep: bool = False, replace_existing: bool = False,
            out=print) -> bool:
    from xmx.data.check import check_dataset
    info = get_info(name)
    final = root / info.dir
    if final.exists():
        r = check_dataset(name, root)
        if r["status"] == "found":
            m = read_manifest(final)
            out(f"{name}: already complete under {final}{' (from ' + m['source'] + ')' if m else ''}; nothing fetched")
            return True
        if not replace_existing:
            out(f"{name}: {final} exists but is incomplete ({r['message'][:200]}); move it away or pass --replace")
            return False
    from filelock import FileLock, Timeout
    lock_path = root / WORK / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        out(f"{name}: another 'xmx.data get' is fetching it into {root} ({lock_path}); let it finish")
        return False
    try:
        return _try_sources(name, root, sources, keep, replace_existing, out)
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: no other process can be holding this file
        lock.release()
        prune_empty(root / WORK)


def _try_sources(name: str, root: Path, sources: DatasetSources, keep: bool, replace_existing: bool, out) -> bool:
    final = root / get_info(name).dir
    errors = []
    for recipe in sources.recipes:
        try:
            m = install(name, root, recipe, keep, replace_existing)
        except SourceError as e:
            errors.append(str(e))
            out(f"{name}: source {recipe.label} failed: {e}")
            continue
        v = m["verified"]
        out(f"{name}: complete from {recipe.label} (train {v['train']}  val {v['val']}  test {v['test']}  "
            f"classes {v['classes']}) -> {final}")
        return True
    out(f"{name}: every source failed; by hand: download {sources.manual}")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmx.data get",
                                     description="Download CoOp datasets into CoOp's $DATA layout, verified.")
    parser.add_argument("datasets", nargs="+", help=f"'all' or any of: {', '.join(GETTABLE)}")
    parser.add_argument("--root", default=os.environ.get("DATA"), help="the $DATA folder (default: $DATA)")
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="imagenet: the folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                             "ILSVRC2012_devkit_t12.tar.gz")
    parser.add_argument("--no-md5", action="store_true", help="imagenet --from: skip the archives' md5 check")
    parser.add_argument("--keep-downloads", action="store_true",
                        help="keep the downloaded archives under $DATA/.xmx-get/ after installing")
    parser.add_argument("--replace", action="store_true",
                        help="replace an existing incomplete dataset folder once a complete one is verified")
    args = parser.parse_args(argv)
    try:
        if not args.root:
            raise XmxError("--root is not set (and $DATA is empty); pass --root <folder for the datasets>")
        names = list(GETTABLE) if args.datasets == ["all"] else args.datasets
        for n in names:
            if n not in GETTABLE:
                raise XmxError(f"get: unknown dataset {n!r}; valid: all, {', '.join(GETTABLE)}")
        if args.from_dir and names != ["imagenet"]:
            raise XmxError("--from is for 'get imagenet' alone (the ILSVRC2012 archives)")
        root = Path(args.root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise XmxError(f"--root {root} is not writable; choose another folder")
        if args.from_dir:
            src = Path(args.from_dir).expanduser()
            if not src.is_dir():
                raise XmxError(f"--from {src} is not a folder; pass the folder holding the ILSVRC2012 archives")
            m = build_imagenet(src, root, check_md5=not args.no_md5)
            v = m["verified"]
            print(f"imagenet: built train {v['train']}  test {v['test']}  classes {v['classes']} -> "
                  f"{root / 'imagenet'}")
            return 0
        cat = catalog()
    except XmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = True
    for n in names:
        if n == "imagenet":
            if (root / "imagenet").is_dir():
                print(f"imagenet: {root / 'imagenet'} exists (check it with python -m xmx.data check {root})")
            else:
                print(IMAGENET_HELP.format(root=root))
                ok = ok and args.datasets == ["all"]  # asked for by name: not got; within 'all': instructions only
            continue
        ok = get_one(n, root, cat[n], args.keep_downloads, args.replace) and ok
        sys.stdout.flush()
    return 0 if ok else 1
