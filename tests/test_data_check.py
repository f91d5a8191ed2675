"""``python -m xmx.data check <root>``: one line per dataset, JSON output, and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_data_coop import fake_coop_tree, link_root, small_split, write_files, write_split
from xmx.data.__main__ import main as data_main
from xmx.data.check import check_all, check_dataset
from xmx.data.coop import COOP_DATASETS


@pytest.fixture(scope="session")
def caltech_tree(tmp_path_factory):
    return fake_coop_tree(tmp_path_factory, "caltech101")


def _lines(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return {ln.split()[0]: ln for ln in out[:-1]}, out[-1]


def test_complete_dataset_found_others_missing(caltech_tree, tmp_path, capsys):
    root = link_root(tmp_path, caltech_tree)
    assert data_main(["check", str(root)]) == 0
    lines, summary = _lines(capsys)
    assert set(lines) == set(COOP_DATASETS)
    assert lines["caltech101"].split()[1] == "found"
    assert "train 4128/4128  val 1649/1649  test 2465/2465  classes 100/100" in lines["caltech101"]
    assert lines["oxford_pets"].split()[1] == "missing" and "oxford_pets/images/<images>" in lines["oxford_pets"]
    assert summary == f"1 of 15 datasets found under {root}, 1 complete"


def test_json_output(caltech_tree, tmp_path, capsys):
    root = link_root(tmp_path, caltech_tree)
    assert data_main(["check", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(COOP_DATASETS)
    assert out["caltech101"] == {"train": 4128, "val": 1649, "test": 2465, "classes": 100, "status": "found"}
    assert out["imagenet"] == {"train": 0, "val": 0, "test": 0, "classes": 0, "status": "missing"}


def test_incomplete_datasets_fail(caltech_tree, tmp_path, capsys):
    root = link_root(tmp_path, caltech_tree)
    split = small_split(per=(3, 1, 1))
    write_split(root / "oxford_pets" / "split_zhou_OxfordPets.json", split)
    paths = [f"oxford_pets/images/{p}" for s in split.values() for p, _, _ in s]
    write_files(root, paths[1:])
    (root / "food-101" / "images").mkdir(parents=True)
    assert data_main(["check", str(root)]) == 1
    lines, summary = _lines(capsys)
    pets = lines["oxford_pets"]
    assert pets.split()[1] == "incomplete" and "train 6/2944" in pets and "classes 2/37" in pets
    assert "1 of 10 images" in pets and paths[0] in pets and "counts differ from the published sizes" in pets
    food = lines["food101"]
    assert food.split()[1] == "incomplete" and "split_zhou_Food101.json not found" in food
    assert lines["caltech101"].split()[1] == "found"
    assert summary.endswith("3 of 15 datasets found under " + str(root) + ", 1 complete")
    r = check_dataset("oxford_pets", root)
    assert r["missing"] == [paths[0]] and r["status"] == "incomplete"


def test_only_named_datasets_and_bad_arguments(caltech_tree, tmp_path, capsys):
    root = link_root(tmp_path, caltech_tree)
    assert data_main(["check", str(root), "--datasets", "oxford_pets,caltech101", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["oxford_pets", "caltech101"]
    assert data_main(["check", str(root), "--datasets", "pets"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown dataset 'pets'; valid choices:") and "\n" not in err
    assert data_main(["check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data root" in err and "nope does not exist" in err and "\n" not in err
    assert data_main(["list"]) == 2


def test_empty_root_is_not_success(tmp_path, capsys):
    assert data_main(["check", str(tmp_path)]) == 1
    lines, summary = _lines(capsys)
    assert all(ln.split()[1] == "missing" for ln in lines.values())
    assert summary.startswith("0 of 15 datasets found")
    assert all(r["status"] == "missing" for r in check_all(tmp_path).values())


def test_module_entry_point(tmp_path):
    (tmp_path / "dtd").mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "xmx.data", "check", str(tmp_path), "--datasets", "dtd"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stderr
    assert p.stdout.splitlines()[0].split()[:2] == ["dtd", "incomplete"]
    assert "dtd/images not found" in p.stdout
