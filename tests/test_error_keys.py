"""Every config key an error message (or a hint in the code) tells the user to set exists in some composed config:
an error that says ``plm.name=...`` when the key is ``plm.name_or_path`` sends the user into a second error.

The keys of every config are read from the YAML files of ``conf/`` (each file at its package: ``method/*.yaml``
under ``method.``, ``# @package _global_`` files at the top), which is what composing every option would give,
without composing 80 configs. A key that is no YAML key passes only when its parent node's ``_target_`` accepts it
as a keyword (``method.scheduler.T_max`` of ``CosineAnnealingLR``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from xmx.config import _accepted_keys, config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = config_dir()


def _package(path: Path) -> str:
    head = path.read_text().splitlines()[:3]
    for line in head:
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            return "" if m.group(1) == "_global_" else m.group(1).replace("_group_", str(path.parent.relative_to(
                CONF)).replace("/", "."))
    rel = path.parent.relative_to(CONF)
    return "" if str(rel) == "." else str(rel).replace("/", ".")


def config_keys() -> dict[str, dict]:
    """Every dotted key of every config file -> its node (a dict for inner nodes)."""
    keys: dict[str, dict] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "defaults":
                    continue
                full = f"{prefix}.{k}" if prefix else str(k)
                keys[full] = v if isinstance(v, dict) else {}
                walk(v, full)

    for f in sorted(CONF.rglob("*.yaml")):
        pkg = _package(f)
        data = yaml.safe_load(f.read_text()) or {}
        if pkg:
            for i, part in enumerate(pkg.split(".")):
                keys.setdefault(".".join(pkg.split(".")[:i + 1]), {})
        walk(data, pkg)
    return keys


def _top_names(keys) -> list[str]:
    return sorted({k.split(".")[0] for k in keys if k.split(".")[0] != "hydra"}, key=len, reverse=True)


def named_keys(tops: list[str]) -> dict[str, list[str]]:
    """Dotted config keys named in the code's messages -> where: every string inside an ``XmxError(...)`` call,
    and every ``key=`` anywhere (hints built before the raise)."""
    token = re.compile(r"(?<![\w.$/{<\-])((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(=?)" % "|".join(tops))
    found: dict[str, list[str]] = {}
    for f in sorted((REPO / "xmx").rglob("*.py")):
        tree = ast.parse(f.read_text())
        in_error = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "XmxError":
                in_error |= {id(s) for s in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in token.finditer(node.value):
                    if id(node) in in_error or m.group(2):
                        found.setdefault(m.group(1), []).append(f"{f.relative_to(REPO)}:{node.lineno}")
    return found


def _exists(key: str, keys: dict) -> bool:
    if key in keys:
        return True
    parent, _, leaf = key.rpartition(".")
    node = keys.get(parent)
    if isinstance(node, dict) and isinstance(node.get("_target_"), str):
        ok = _accepted_keys(node["_target_"])
        return ok is not None and leaf in ok
    return False


def test_every_key_named_in_a_message_exists():
    keys = config_keys()
    assert {"method.optimizer.lr", "data.root", "plm.name_or_path", "trainer.accelerator", "seed"} <= set(keys)
    named = named_keys(_top_names(keys))
    assert len(named) > 20, named  # the scan finds the keys the messages name
    missing = {k: where for k, where in named.items() if not _exists(k, keys)}
    assert not missing, "messages name keys that no config has: " + "; ".join(
        f"{k} ({', '.join(w[:2])})" for k, w in sorted(missing.items()))


def test_the_scan_catches_a_key_that_does_not_exist():
    keys = config_keys()
    tops = _top_names(keys)
    token = re.compile(r"(?<![\w.$/{<\-])((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)" % "|".join(tops))
    for bad in ("plm.name", "data.glue_root", "data.coco_root", "data.wikitext_root", "method.lrr"):
        assert token.search(f"point {bad} at the folder") and not _exists(bad, keys), bad
    assert _exists("method.scheduler.T_max", keys)  # a keyword of the node's _target_
