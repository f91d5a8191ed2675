"""Recipe tables: what each method's release runs, setting by setting, and where xmx's presets differ.

One YAML file per method config (``xmx/recipes/<method>.yaml``, the format below). ``tests/test_recipes.py``
composes every preset a table names with every dataset the preset supports (Hydra compose, no run) and fails when a
resolved value differs from its row; a run records its preset's deviations in ``results.json`` (``recipe``) and
``python -m xmx.tables show`` prints them.

    method: clip_lora                  # conf/method/<name>.yaml
    release: {repo: owner/name, commit: <40 hex or "HEAD of fetch on YYYY-MM-DD">}
    presets: [clip_lora_16shot, ...]   # conf/experiment names covered
    settings:
      - key: method.prompt             # dotted key of the RESOLVED config (null: a behaviour that is no config key)
        release: "a photo of a {}."    # the value the release runs
        source: "file.py:41 ..."       # where (file:line of the release)
        when: {dataset: imagenet}      # optional: dataset | protocol | shots | preset (a value or a list of values)
        xmx: <value>                   # optional: xmx's default where it differs from the release ...
        deviation: "<reason>"          # ... and then the reason (required with xmx; a behaviour row, key null,
                                       # may name a deviation without an xmx value)
        test: tests/test_x.py::name    # optional: the test that holds a behaviour (key: null)
        note: "..."                    # optional: anything a reader should know

A row without ``when`` holds for every case of every preset; where several rows of one key hold, the most specific
(most ``when`` keys) wins. The expected value of a row is ``xmx`` when given,
else ``release``; numbers compare as numbers (1e-9 relative), lists element-wise; a value ``"${key}"`` is that key of
the same resolved config (``"${shots}"``: K per class).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from xmx.errors import XmxError

__all__ = [
    "WHEN_KEYS",
    "check",
    "context",
    "equal",
    "load_recipes",
    "preset_deviations",
    "recipe_record",
    "rows_for",
    "table_for",
]

WHEN_KEYS = ("dataset", "protocol", "shots", "preset")
_ROW_KEYS = {"key", "release", "source", "when", "xmx", "deviation", "test", "note"}
_TOP_KEYS = {"method", "release", "presets", "settings", "notes"}


def _validate(name: str, t: dict) -> dict:
    if not isinstance(t, dict):
        raise XmxError(f"recipe table {name}: not a mapping")
    for k in ("method", "release", "presets", "settings"):
        if k not in t:
            raise XmxError(f"recipe table {name}: no {k!r}; a table needs method, release, presets, settings")
    unknown = set(t) - _TOP_KEYS
    if unknown:
        raise XmxError(f"recipe table {name}: unknown key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    for i, row in enumerate(t["settings"]):
        where = f"recipe table {name}, setting {i} ({row.get('key')})"
        if not isinstance(row, dict) or "key" not in row or "release" not in row or "source" not in row:
            raise XmxError(f"{where}: every setting needs key, release and source")
        bad = set(row) - _ROW_KEYS
        if bad:
            raise XmxError(f"{where}: unknown field(s) {sorted(bad)}; valid: {sorted(_ROW_KEYS)}")
        if "xmx" in row and not row.get("deviation"):
            raise XmxError(f"{where}: 'xmx' and 'deviation' go together (xmx's value and the reason it differs)")
        if row.get("deviation") and "xmx" not in row and row["key"] is not None:
            raise XmxError(f"{where}: a deviation of a config key names xmx's value ('xmx') beside the reason")
        if bad := set(row.get("when") or {}) - set(WHEN_KEYS):
            raise XmxError(f"{where}: when: unknown key(s) {sorted(bad)}; valid: {', '.join(WHEN_KEYS)}")
    return t


def load_recipes(folder: str | Path | None = None) -> dict[str, dict]:
    """Every recipe table, by file stem (normally = its ``method``)."""
    if folder is None:
        files = [f for f in resources.files("xmx.recipes").iterdir() if f.name.endswith(".yaml")]
    else:
        files = sorted(Path(folder).glob("*.yaml"))
    out = {}
    for f in sorted(files, key=lambda f: f.name):
        name = f.name[:-5]
        out[name] = _validate(name, yaml.safe_load(f.read_text(encoding="utf-8")))
    return out


def context(cfg, preset: str | None = None) -> dict:
    """The case a composed config is: dataset, protocol, shots, preset (default: ``task_name``)."""
    from omegaconf import OmegaConf
    sel = (lambda k: OmegaConf.select(cfg, k, default=None)) if OmegaConf.is_config(cfg) else \
        (lambda k: _get(cfg, k))
    return {"dataset": sel("data.name"), "protocol": sel("protocol.name"), "shots": sel("shots"),
            "preset": preset if preset is not None else sel("task_name")}


def _get(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _matches(when: dict | None, ctx: dict) -> bool:
    for k, v in (when or {}).items():
        vals = v if isinstance(v, list) else [v]
        if str(ctx.get(k)) not in {str(x) for x in vals}:
            return False
    return True


def rows_for(table: dict, ctx: dict) -> list[dict]:
    """The rows that hold for ``ctx``: of several rows of one key, the most specific (most ``when`` keys) wins, so a
    row ``when: {dataset: imagenet}`` overrides the key's general row on ImageNet."""
    rows = [r for r in table["settings"] if _matches(r.get("when"), ctx)]
    best: dict = {}
    for r in rows:
        if r["key"] is not None:
            best[r["key"]] = max(best.get(r["key"], 0), len(r.get("when") or {}))
    return [r for r in rows if r["key"] is None or len(r.get("when") or {}) == best[r["key"]]]


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def _resolved(cfg, key: str):
    from omegaconf import OmegaConf
    if not OmegaConf.is_config(cfg):
        return _get(cfg, key)
    v = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _expand(value, cfg):
    """A row value ``"${key}"`` stands for that key of the case's resolved config (``"${shots}"``: K validation
    images per class; ``"${method.epochs}"``: one cached view per epoch)."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}") and value.count("$") == 1:
        return _resolved(cfg, value[2:-1])
    return value


def check(cfg, table: dict, preset: str | None = None) -> tuple[list[dict], list[dict]]:
    """(drift, deviations) of one composed config against one table: ``drift`` lists rows whose resolved value is not
    the expected one (``xmx`` if given, else ``release``); ``deviations`` the matching rows that name a deviation."""
    ctx = context(cfg, preset)
    drift, devs = [], []
    for row in rows_for(table, ctx):
        if row.get("deviation"):
            devs.append({k: row[k] for k in ("key", "release", "xmx", "deviation") if k in row})
        if row["key"] is None:
            continue
        want = _expand(row["xmx"] if "xmx" in row else row["release"], cfg)
        got = _resolved(cfg, row["key"])
        if not equal(got, want):
            drift.append({"key": row["key"], "expected": want, "resolved": got, "release": row["release"],
                          "source": row["source"]})
    return drift, devs


def table_for(method: str | None, preset: str | None = None, recipes: dict | None = None) -> tuple[str, dict] | None:
    """The table of ``method`` (a preset's own table first when several describe the method)."""
    recipes = load_recipes() if recipes is None else recipes
    cands = [(n, t) for n, t in recipes.items() if t["method"] == method]
    for n, t in cands:
        if preset in t["presets"]:
            return n, t
    return cands[0] if cands else None


def recipe_record(cfg) -> dict | None:
    """What results.json records: the release the method's table describes, the deviations of this case (named in the
    table, with reasons) and the keys this run changed away from the table (overrides: ``changed``)."""
    from omegaconf import OmegaConf
    method = OmegaConf.select(cfg, "method.name", default=None)
    preset = OmegaConf.select(cfg, "task_name", default=None)
    try:
        found = table_for(method, preset)
        if found is None:
            return None
        name, table = found
        drift, devs = check(cfg, table, preset)
    except Exception as e:  # noqa: BLE001 - a broken table must not lose a finished run: the record says so
        return {"error": f"{type(e).__name__}: {e}"}
    return {"table": f"xmx/recipes/{name}.yaml", "release": table["release"],
            "preset_covered": preset in table["presets"], "deviations": devs,
            "changed": [{k: d[k] for k in ("key", "expected", "resolved", "release")} for d in drift]}


def preset_deviations(preset: str, method: str | None = None, recipes: dict | None = None) -> list[dict]:
    """The deviation rows a preset's table names (every case; ``when`` kept), for ``xmx.tables show``."""
    recipes = load_recipes() if recipes is None else recipes
    out = []
    for name, t in recipes.items():
        if preset in t["presets"] and (method is None or t["method"] == method):
            for r in t["settings"]:
                if r.get("deviation") and _matches({k: v for k, v in (r.get("when") or {}).items() if k == "preset"},
                                                   {"preset": preset}):
                    out.append({"table": name, **{k: r[k] for k in ("key", "release", "xmx", "deviation", "when")
                                                  if k in r}})
    return out
