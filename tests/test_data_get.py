"""``python -m xmx.data get``: downloads from a loopback server (plain URLs and a Hub-shaped ``HF_ENDPOINT``),
checksums, resumption, fallback between sources, verification against the split files, the manifest, re-runs, the
ImageNet devkit reorganisation, and a run on what was fetched. No test reaches a real host: every socket connection
to anything but 127.0.0.1 raises."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest

from data_server import COMMIT, FakeSources
from xmx.data import get as G
from xmx.data.sources import HUB_REPO, HUB_REVISION, DatasetSources, Recipe, Remote, catalog


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection to a host other than 127.0.0.1 fails the test."""
    real = socket.socket.connect

    def connect(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        assert host in ("127.0.0.1", "::1", "localhost") or isinstance(addr, (str, bytes)), f"real host {addr}"
        return real(self, addr)
    monkeypatch.setattr(socket.socket, "connect", connect)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # the loopback Hub is reachable; tests run with it set


@pytest.fixture
def server(monkeypatch):
    with FakeSources() as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("XMX_DATA_MIRROR", s.url)
        yield s
        assert all(not p.startswith("http") for _, p, _ in s.log)


def _tree_files(tmp_path_factory) -> dict[str, bytes]:
    from xmx.data.fake import write_fake_dataset
    root = tmp_path_factory.mktemp("fakedtd")
    write_fake_dataset(root, "dtd", size=4)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "dtd").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dtd_files(tmp_path_factory) -> dict[str, bytes]:
    """Every file of a fake dtd tree (tiny JPEGs at the paths CoOp's split file lists), keyed ``dtd/...``."""
    return _tree_files(tmp_path_factory)


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for k, v in files.items():
            z.writestr(k, v)
    return buf.getvalue()


def tgz_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:
        for k, v in files.items():
            info = tarfile.TarInfo(k)
            info.size = len(v)
            t.addfile(info, io.BytesIO(v))
    return buf.getvalue()


def url_recipe(server, path: str, data: bytes, md5: str | None = "auto") -> Recipe:
    server.files[path] = data
    md5 = hashlib.md5(data).hexdigest() if md5 == "auto" else md5
    return Recipe("torchvision", (Remote("url", path.rsplit("/", 1)[-1], url=server.url + path, md5=md5),), root="dtd")


def hub_recipe(server, data: bytes, repo="org/mirror", path="dtd.zip") -> Recipe:
    server.hub[(repo, path)] = data
    return Recipe("hub", (Remote("hub", path, repo=repo, revision=HUB_REVISION, path=path),))


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_catalog_defaults_are_real_hosts_and_the_mirror_moves_every_url(monkeypatch):
    monkeypatch.delenv("XMX_DATA_MIRROR", raising=False)
    cat = catalog()
    assert set(cat) == set(G.GETTABLE) - {"imagenet"}
    assert cat["dtd"].recipes[0].files[0].revision == HUB_REVISION and cat["dtd"].recipes[0].files[0].repo == HUB_REPO
    monkeypatch.setenv("XMX_DATA_MIRROR", "http://127.0.0.1:9")
    for name, ds in catalog().items():
        for r in ds.recipes:
            for f in r.files:
                assert f.kind != "url" or f.url.startswith("http://127.0.0.1:9/"), (name, f.url)


def test_checksum_mismatch_is_rejected_with_one_line_and_nothing_left(server, dtd_files, tmp_path):
    root = tmp_path / "DATA"
    root.mkdir()
    bad_url = url_recipe(server, "/host/dtd.tar.gz", tgz_of(dtd_files), md5="0" * 32)
    server.hub[("org/mirror", "dtd.zip")] = zip_of(dtd_files)
    server.hub_etag[("org/mirror", "dtd.zip")] = "f" * 64  # the Hub publishes another sha256
    bad_hub = Recipe("hub", (Remote("hub", "dtd.zip", repo="org/mirror", revision=HUB_REVISION, path="dtd.zip"),))
    lines: list[str] = []
    ok = G.get_one("dtd", root, DatasetSources((bad_hub, bad_url), "dtd.zip by hand"), out=lines.append)
    assert not ok
    assert "sha256" in lines[0] and "differs from the Hub's LFS sha256 " + "f" * 64 in lines[0] and "\n" not in lines[0]
    assert "md5" in lines[1] and "differs from the published " + "0" * 32 in lines[1] and "deleted" in lines[1]
    assert lines[2].startswith("dtd: every source failed; by hand: download dtd.zip by hand")
    assert files_under(root) == [] and not (root / "dtd").exists()


def test_interrupted_download_resumes_from_its_partial_file(server, dtd_files, tmp_path):
    root = tmp_path / "DATA"
    data = tgz_of(dtd_files)
    recipe = url_recipe(server, "/host/dtd.tar.gz", data)
    part = root / G.WORK / "dtd" / "downloads" / "torchvision" / "dtd.tar.gz.part"
    part.parent.mkdir(parents=True)
    half = len(data) // 2
    part.write_bytes(data[:half])  # a download killed half-way
    assert G.get_one("dtd", root, DatasetSources((recipe,), ""), out=print)
    gets = [(m, r) for m, p, r in server.log if p == "/host/dtd.tar.gz" and m == "GET"]
    assert gets == [("GET", f"bytes={half}-")]  # only the rest was asked for
    m = json.loads((root / "dtd" / G.MANIFEST).read_text())
    assert m["files"][0]["sha256"] == hashlib.sha256(data).hexdigest() and m["files"][0]["md5"] == \
        hashlib.md5(data).hexdigest()
    assert not (root / G.WORK / "dtd").exists()  # downloads cleaned once installed


def test_a_dead_first_source_falls_back_to_the_next(server, dtd_files, tmp_path, capsys):
    root = tmp_path / "DATA"
    first = hub_recipe(server, zip_of(dtd_files))
    server.dead.add("/org/mirror/")
    second = url_recipe(server, "/host/dtd.tar.gz", tgz_of(dtd_files))
    lines: list[str] = []
    assert G.get_one("dtd", root, DatasetSources((first, second), ""), out=lines.append)
    assert "source hub:org/mirror@" in lines[0] and "failed" in lines[0] and server.url in lines[0]
    assert lines[1].startswith("dtd: complete from torchvision:") and "train 2820  val 1128  test 1692" in lines[1]
    from xmx.data.check import main as check_main
    assert check_main([str(root), "--datasets", "dtd"]) == 0
    out = capsys.readouterr().out
    assert "found" in out and f"from torchvision:{server.url}/host/dtd.tar.gz" in out and "xmx_manifest.json" in out


def test_an_archive_missing_a_listed_image_is_named_and_not_installed(server, dtd_files, tmp_path):
    root = tmp_path / "DATA"
    gone = sorted(k for k in dtd_files if k.endswith(".jpg"))[100]
    files = {k: v for k, v in dtd_files.items() if k != gone}
    lines: list[str] = []
    assert not G.get_one("dtd", root, DatasetSources((hub_recipe(server, zip_of(files)),), "dtd.zip"),
                         out=lines.append)
    assert "verification failed" in lines[0] and gone in lines[0] and "1 of 5640 images" in lines[0]
    assert not (root / "dtd").exists() and not (root / G.WORK / "dtd" / "stage").exists()


def test_hub_source_with_its_published_hash_and_revision_in_the_manifest_then_a_rerun_fetches_nothing(
        server, dtd_files, tmp_path, capsys):
    root = tmp_path / "DATA"
    data = zip_of(dtd_files)
    server.hub[(HUB_REPO, "dtd.zip")] = data
    assert G.main(["dtd", "--root", str(root)]) == 0  # the catalog's first source, through HF_ENDPOINT
    m = json.loads((root / "dtd" / G.MANIFEST).read_text())
    assert m["source"] == f"hub:{HUB_REPO}@{HUB_REVISION[:12]}" and m["revision"] == COMMIT
    assert m["files"] == [{"name": "dtd.zip", "repo": HUB_REPO, "repo_type": "model", "path": "dtd.zip",
                           "revision": COMMIT, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    assert m["verified"] == {"train": 2820, "val": 1128, "test": 1692, "classes": 47}
    assert (f"/{HUB_REPO}/resolve/{HUB_REVISION}/dtd.zip") in {p for _, p, _ in server.log}
    assert files_under(root / G.WORK) == []  # the Hub cache copy is dropped after install
    n = len(server.log)
    capsys.readouterr()
    assert G.main(["dtd", "--root", str(root)]) == 0
    assert len(server.log) == n  # nothing fetched
    assert "already complete" in capsys.readouterr().out


def test_every_source_down_says_what_to_download_by_hand(server, tmp_path, capsys):
    server.dead.add("/")
    root = tmp_path / "DATA"
    assert G.main(["dtd", "eurosat", "imagenet", "--root", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    manual = [ln for ln in out if "every source failed; by hand: download" in ln]
    assert [ln.split(":")[0] for ln in manual] == ["dtd", "eurosat"]
    assert "$DATA/dtd/images/" in manual[0] and "$DATA/eurosat/2750/" in manual[1]
    assert any("image-net.org" in ln for ln in out) and any("--from" in ln for ln in out)
    assert files_under(root) == []


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    assert G.main(["dtdx", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: get: unknown dataset 'dtdx'")
    assert G.main(["dtd", "--root", str(tmp_path), "--from", str(tmp_path)]) == 2
    assert "--from is for 'get imagenet'" in capsys.readouterr().err
    from filelock import FileLock
    (tmp_path / G.WORK).mkdir()
    with FileLock(str(tmp_path / G.WORK / "dtd.lock")):  # another get at work on the same dataset
        lines: list[str] = []
        assert not G.get_one("dtd", tmp_path, DatasetSources((), ""), out=lines.append)
    assert lines == [f"dtd: another 'xmx.data get' is fetching it into {tmp_path} ({tmp_path / G.WORK / 'dtd.lock'}); "
                     "let it finish"]


# ---- ImageNet from the ILSVRC2012 archives ----------------------------------------------------------------------
def _fake_ilsvrc(folder: Path, wnids: list[str], val_labels: list[int]) -> None:
    """ILSVRC2012_img_train.tar (one tar per wnid), ILSVRC2012_img_val.tar (flat), a devkit whose meta.mat lists
    the leaf synsets (ILSVRC2012_ID 1.. in wnid order, plus one non-leaf) and the validation ground truth."""
    import numpy as np
    import scipy.io as sio
    folder.mkdir(parents=True)
    inner = {}
    for w in wnids:
        inner[f"{w}.tar"] = _tar({f"{w}_{k}.JPEG": f"{w}{k}".encode() for k in range(2)})
    (folder / "ILSVRC2012_img_train.tar").write_bytes(_tar(inner))
    (folder / "ILSVRC2012_img_val.tar").write_bytes(
        _tar({f"ILSVRC2012_val_{i + 1:08d}.JPEG": f"v{i}".encode() for i in range(len(val_labels))}))
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    syn = np.array([(i + 1, w, f"name {w}", "g", 0) for i, w in enumerate(wnids)] + [(999, "n0", "x", "g", 3)],
                   dtype=dt)
    kit = folder / "kit"
    (kit / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
    sio.savemat(str(kit / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"), {"synsets": syn})
    (kit / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{y}\n" for y in val_labels))
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        t.add(kit / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for k, v in files.items():
            info = tarfile.TarInfo(k)
            info.size = len(v)
            t.addfile(info, io.BytesIO(v))
    return buf.getvalue()


def test_imagenet_from_the_ilsvrc_archives_is_reorganised_by_the_devkit_labels(tmp_path, capsys):
    from xmx.data import coop
    wnids = list(coop.shipped_wnids("imagenet")[:3])
    src, root = tmp_path / "ilsvrc", tmp_path / "DATA"
    _fake_ilsvrc(src, wnids, val_labels=[2, 1, 3, 2, 2, 1])
    assert G.main(["imagenet", "--root", str(root)]) == 1  # without --from: where to get it
    assert "image-net.org" in capsys.readouterr().out
    assert G.main(["imagenet", "--root", str(root), "--from", str(src)]) == 2  # not the published archives
    assert "md5" in capsys.readouterr().err and not (root / "imagenet").exists()
    assert G.main(["imagenet", "--root", str(root), "--from", str(src), "--no-md5"]) == 0
    img = root / "imagenet" / "images"
    assert sorted(os.listdir(img / "train")) == wnids
    assert sorted(os.listdir(img / "train" / wnids[1])) == [f"{wnids[1]}_0.JPEG", f"{wnids[1]}_1.JPEG"]
    assert (img / "train" / wnids[0] / f"{wnids[0]}_1.JPEG").read_bytes() == f"{wnids[0]}1".encode()
    val = {w: sorted(os.listdir(img / "val" / w)) for w in os.listdir(img / "val")}
    assert val == {wnids[1]: ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG",
                              "ILSVRC2012_val_00000005.JPEG"],
                   wnids[0]: ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000006.JPEG"],
                   wnids[2]: ["ILSVRC2012_val_00000003.JPEG"]}
    names = coop.read_classnames_txt(root / "imagenet" / "classnames.txt")
    assert len(names) == 1000 and names[wnids[0]] == coop.open_clip_imagenet_classnames()[0]
    s, missing = coop.scan_dataset("imagenet", root)
    assert len(s.test) == 6 and len(s.train) == 6 and len(missing) == 2 * 997  # 3 of 1000 classes
    assert json.loads((root / "imagenet" / G.MANIFEST).read_text())["verified"]["test"] == 6
    assert files_under(root / G.WORK) == []


# ---- end to end -------------------------------------------------------------------------------------------------
def test_get_then_run_end_to_end(server, dtd_files, tmp_path, make_cfg, one_thread):
    from xmx.run import run
    root = tmp_path / "DATA"
    server.hub[(HUB_REPO, "dtd.zip")] = zip_of(dtd_files)
    assert G.main(["dtd", "--root", str(root)]) == 0
    res = run(make_cfg(["experiment=zeroshot_16shot", "backbone=tiny", "data=dtd", f"data.root={root}", "shots=1",
                        "trainer.accelerator=cpu"]))
    assert res["dataset"] == "dtd" and res["data"]["splits"]["test"]["n"] == 1692
    assert res["data"]["synthetic"] is True  # the fake archive carries fake.py's marker


def test_a_connection_dropped_mid_file_is_resumed_and_a_hub_partial_too(server, dtd_files, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 4096)  # written to disk in small chunks, as a large file would be
    root = tmp_path / "DATA"
    data = tgz_of(dtd_files)
    recipe = url_recipe(server, "/host/dtd.tar.gz", data)
    server.truncate_once.add("/host/dtd.tar.gz")  # the server sends half the body and closes the connection
    assert G.get_one("dtd", root, DatasetSources((recipe,), ""), out=print)
    gets = [r for m, p, r in server.log if p == "/host/dtd.tar.gz" and m == "GET"]
    assert gets[0] is None and len(gets) == 2 and gets[1].startswith("bytes=")
    assert len(data) // 4 < int(gets[1][6:-1]) <= len(data) // 2  # only what had not arrived was asked for again
    # a Hub file killed half-way is resumed the same way by the next run
    root2 = tmp_path / "DATA2"
    z = zip_of(dtd_files)
    server.hub[("org/mirror", "dtd.zip")] = z
    blob = root2 / G.WORK / "dtd" / "downloads" / "hub" / "dtd.zip.part"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(z[:1000])
    n = len(server.log)
    recipe = Recipe("hub", (Remote("hub", "dtd.zip", repo="org/mirror", revision=HUB_REVISION, path="dtd.zip"),))
    assert G.get_one("dtd", root2, DatasetSources((recipe,), ""), out=print)
    assert [r for m, p, r in server.log[n:] if m == "GET" and p.endswith("/dtd.zip")] == ["bytes=1000-"]
