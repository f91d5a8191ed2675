"""The room order of docs/architecture.md, enforced with import-linter's contracts in `.importlinter`: every folder
imports only the folders below it, and a method family never imports another family's file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), str(REPO / ".importlinter"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of the package to break on purpose."""
    shutil.copytree(REPO / "xmx", tmp_path / "xmx", ignore=shutil.ignore_patterns("__pycache__", "conf",
                                                                                  "fewshot_subsets", "splits"))
    return tmp_path


def test_the_checkout_keeps_every_contract():
    r = lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("where,line,broken", [
    # the data layer reaching up into a method (what text_datamodule did with xadapter's MLMMasker)
    ("data/fewshot.py", "    from xmx.methods.mma import MMAMethod\n", "xmx.data.fewshot -> xmx.methods.mma"),
    # the feature store reaching up into the DataModules
    ("features/store.py", "from xmx.datamodules.clip import CLIPDataModule\n",
     "xmx.features.store -> xmx.datamodules.clip"),
    # one family built on another's file (what mma.py did with clip_adapter's AdapterMethod)
    ("methods/mma.py", "from xmx.methods.clip_adapter import ClipAdapter\n", "xmx.methods.mma -> xmx.methods.clip_adapter"),
])
def test_an_upward_or_sideways_import_breaks_a_contract(tree_copy, where, line, broken):
    path = tree_copy / "xmx" / where
    text = path.read_text()
    if line.startswith("    "):  # an import inside a function counts as much as one at the top
        text += "\n\ndef _late():\n" + line
    else:
        text += "\n" + line
    path.write_text(text)
    r = lint(tree_copy)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and broken in r.stdout, r.stdout
