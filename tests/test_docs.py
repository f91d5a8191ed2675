"""Docs that tests keep true (as tests/test_bad_input.py keeps docs/errors.md): README's preset list, method list and
config-group table against conf/, and the results.json field tables (README, docs/architecture.md) against the
fields xmx/results.py writes."""

from __future__ import annotations

import re
from pathlib import Path

from xmx.config import config_dir
from xmx.results import FIELDS, OPTIONAL_FIELDS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CONF = config_dir()


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_")}


def _section(text: str, start: str, end: str) -> str:
    i = text.index(start)
    return text[i:text.index(end, i)]


def _ticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


def _group_rows() -> dict[str, str]:
    """README's config-group table: group name -> the row's options cell."""
    table = _section(README, "| group | what | options |", "\n\n")
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for group in re.findall(r"`([\w]+)/`", cells[0]):
            rows[group] = cells[2]
    return rows


def test_every_preset_is_listed_in_the_readme_and_every_listed_preset_exists():
    text = _section(README, "**Experiment presets**", "\n## ")
    listed = {t for t in _ticked(text) if re.fullmatch(r"[a-z0-9_]+", t)}
    presets = _options("experiment")
    assert presets - listed == set(), f"presets missing from README's list: {sorted(presets - listed)}"
    assert listed - presets - {"data", "shots", "seed"} == set(), \
        f"README lists presets that are not in conf/experiment: {sorted(listed - presets)}"


def test_readme_method_list_is_conf_method():
    listed = _ticked(_group_rows()["method"])
    assert listed == _options("method"), (f"README's method/ row differs from conf/method: missing "
                                          f"{sorted(_options('method') - listed)}, extra {sorted(listed - _options('method'))}")


def test_readme_config_groups_are_conf_groups():
    rows = _group_rows()
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"}
    assert groups - set(rows) == set(), f"config groups missing from README's table: {sorted(groups - set(rows))}"
    assert set(rows) - groups == set(), f"README's table names groups that do not exist: {sorted(set(rows) - groups)}"
    for group in ("backbone", "plm", "method"):  # the rows that enumerate every option
        listed = {t for t in _ticked(rows[group]) if re.fullmatch(r"[a-z0-9_]+", t)}
        assert listed == _options(group), f"README's {group}/ row differs from conf/{group}: {sorted(listed ^ _options(group))}"


def test_readme_results_table_names_every_field_results_py_writes():
    table = _section(README, "| field | meaning |", "\n\n")
    listed = set()
    for line in table.splitlines()[2:]:
        listed |= _ticked(line.strip("|").split("|")[0])
    fields = set(FIELDS) | set(OPTIONAL_FIELDS)
    assert listed == fields, f"README's results.json table: missing {sorted(fields - listed)}, extra {sorted(listed - fields)}"


def test_architecture_results_block_names_every_field():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = _section(doc, '{"schema": "xmx.results/1"', "```")
    keys = set(re.findall(r'"(\w+)":', block))
    fields = set(FIELDS) | set(OPTIONAL_FIELDS)
    assert fields - keys == set(), f"docs/architecture.md's results.json block misses {sorted(fields - keys)}"
