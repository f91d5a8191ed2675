"""``python -m xmx.tables``: one command per published table that xmx ships reference numbers for.

    python -m xmx.tables list                       # the tables (xmx/paper_tables.yaml) and their grids
    python -m xmx.tables plan tip_adapter_fewshot   # how many jobs, how many done, which datasets are missing
    python -m xmx.tables run tip_adapter_fewshot [hydra overrides, e.g. trainer=gpu hydra/launcher=slurm]
    python -m xmx.tables show tip_adapter_fewshot   # the table next to the published one, per-cell differences

A table's grid is methods (experiment presets) × datasets × shots × seeds with its protocol and selection mode
(``xmx/paper_tables.yaml``). ``run`` prints the plan, launches one ``python -m xmx.run -m`` multirun per preset for the
jobs whose data are present (complete jobs are skipped by the run's own job index, interrupted ones resume), then
prints the comparison. Job identity and "done" are those of ``xmx.run`` (``xmx.jobs``: ``job_id``,
``${paths.log_dir}/.index``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from xmx.errors import XmxError
from xmx.results import SELECTION_MODES


@dataclass
class Job:
    experiment: str
    dataset: str
    shots: int
    seed: int
    selection: str
    overrides: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        return [f"experiment={self.experiment}", f"data={self.dataset}", f"shots={self.shots}", f"seed={self.seed}",
                f"selection={self.selection}", *self.overrides]


def load_tables(path=None) -> dict:
    text = (Path(path).read_text(encoding="utf-8") if path else
            resources.files("xmx").joinpath("paper_tables.yaml").read_text(encoding="utf-8"))
    tables = (yaml.safe_load(text) or {}).get("tables") or {}
    for name, t in tables.items():
        for k in ("title", "references", "datasets", "jobs"):
            if k not in t:
                raise XmxError(f"paper table {name!r} has no {k!r}; every table needs title, references, datasets, jobs")
    return tables


def get_table(name: str, tables: dict | None = None) -> dict:
    tables = load_tables() if tables is None else tables
    if name not in tables:
        raise XmxError(f"unknown table {name!r}; valid choices: {', '.join(tables)} (python -m xmx.tables list)")
    return tables[name]


def grid(table: dict) -> list[Job]:
    """Every job of the table: for each preset, datasets × shots × seeds with its selection and overrides."""
    jobs = []
    for j in table["jobs"]:
        sel = j.get("selection", table.get("selection", "val"))
        if sel not in SELECTION_MODES:
            raise XmxError(f"paper table job {j['experiment']}: selection {sel!r}; valid choices: "
                           f"{', '.join(SELECTION_MODES)}")
        for ds in j.get("datasets", table["datasets"]):
            extra = list(j.get("overrides") or []) + list((j.get("dataset_overrides") or {}).get(ds) or [])
            for shots in j.get("shots", table.get("shots", [16])):
                for seed in j.get("seeds", table.get("seeds", [1])):
                    jobs.append(Job(j["experiment"], ds, int(shots), int(seed), sel, extra))
    return jobs


def presets_present() -> set[str]:
    from xmx.config import config_dir
    return {p.stem for p in (config_dir() / "experiment").glob("*.yaml")}


class Composer:
    """Composes job configs in one Hydra context (``xmx.config.compose``) and checks each composition with
    ``preflight(cfg, plan_only=True)`` before anything is launched. Jobs that differ only in ``shots``/``seed`` share
    one composition with those two top-level keys set afterwards (every other key refers to them by interpolation),
    which makes a plan of a few hundred jobs take seconds instead of minutes."""

    def __init__(self, user_overrides=()):
        self.user = [o for o in user_overrides if not o.startswith("hydra")]
        self._cache: dict = {}

    def __enter__(self):
        from xmx.config import config_context
        self._ctx = config_context()
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def __call__(self, job: Job):
        from omegaconf import open_dict

        from xmx.config import compose
        from xmx.preflight import preflight
        key = (job.experiment, job.dataset, job.selection, tuple(job.overrides))
        if key not in self._cache:
            overrides = job.args() + self.user
            try:
                cfg = compose(overrides)
                preflight(cfg, plan_only=True)
            except XmxError as e:  # name the job
                raise XmxError(f"cannot compose job {' '.join(overrides)}: {e}") from None
            self._cache[key] = cfg
        cfg = self._cache[key].copy()
        with open_dict(cfg):
            cfg.shots, cfg.seed = job.shots, job.seed
        return cfg


def compose_job(job: Job, user_overrides=()):
    with Composer(user_overrides) as c:
        return c(job)


def _data_folders(cfg) -> list[tuple[str, Path]]:
    """(dataset, folder) of every image dataset a job reads under $DATA: the source and the protocol's targets."""
    from xmx.data.datasets import DATASETS
    root = Path(str(cfg.data.root)).expanduser()
    names = [str(cfg.data.name)] + [str(t) for t in (cfg.protocol.get("targets") or [])]
    return [(n, root / DATASETS[n].dir) for n in names if n in DATASETS and n != "synthetic"]


def _done(cfg, jid: str) -> Path | None:
    """The complete results.json of job ``jid`` recorded in the job index, else None."""
    from xmx.jobs import JobIndex
    return JobIndex(Path(str(cfg.paths.log_dir)).expanduser().resolve()).complete(jid)


@dataclass
class Plan:
    jobs: list[Job]
    done: dict[int, Path]             # job index -> results.json
    missing_data: dict[str, str]      # dataset -> folder that is missing
    missing_presets: list[str]
    runnable: list[int]               # jobs not done whose data and preset exist

    def lines(self, name: str, table: dict) -> list[str]:
        n, d = len(self.jobs), len(self.done)
        out = [f"table {name}: {table['title']}",
               f"  {n} jobs ({', '.join(sorted({j.experiment for j in self.jobs}))}), {d} already done, "
               f"{len(self.runnable)} to run"]
        if self.missing_data:
            out.append(f"  missing under $DATA ({len(self.missing_data)}): "
                       + ", ".join(f"{k} ({v})" for k, v in sorted(self.missing_data.items())))
        else:
            out.append("  missing under $DATA: none")
        if self.missing_presets:
            out.append(f"  presets not in this checkout (their jobs are skipped): {', '.join(self.missing_presets)}")
        out += [f"  note: {x}" for x in table.get("notes") or []]
        return out


def plan(table: dict, user_overrides=()) -> Plan:
    from omegaconf import OmegaConf

    from xmx.jobs import early_datamodule, job_id
    fingerprints: dict[str, dict | None] = {}

    def jid(cfg) -> str:
        """The job id exactly as ``xmx.run`` computes it: with the fingerprint of the images the job reads (one
        stat per file, content hashes cached), shared by the jobs that read the same lists."""
        key = repr([OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                    for k in ("data", "protocol", "shots", "seed")])
        if key not in fingerprints:
            fingerprints[key] = early_datamodule(cfg)[1]
        return job_id(cfg, fingerprints[key])

    jobs = grid(table)
    have = presets_present()
    missing_presets = sorted({j.experiment for j in jobs} - have)
    done, missing, runnable = {}, {}, []
    with Composer(user_overrides) as compose:
        for i, job in enumerate(jobs):
            if job.experiment not in have:
                continue
            cfg = compose(job)
            absent = [(n, str(p)) for n, p in _data_folders(cfg) if not p.is_dir()]
            missing.update(absent)
            res = None if absent else _done(cfg, jid(cfg))
            if res is not None:
                done[i] = res
            elif not absent:
                runnable.append(i)
    return Plan(jobs, done, missing, missing_presets, runnable)


def launch_commands(p: Plan, user_overrides=()) -> list[list[str]]:
    """One multirun per (preset, selection, overrides) over the runnable jobs' datasets, shots and seeds. A grid cell
    that was not in the plan (its data is missing) is never launched: datasets with missing data are left out."""
    groups: dict[tuple, dict] = {}
    for i in p.runnable:
        j = p.jobs[i]
        g = groups.setdefault((j.experiment, j.selection, tuple(j.overrides)), {"data": [], "shots": [], "seed": []})
        for k, v in (("data", j.dataset), ("shots", j.shots), ("seed", j.seed)):
            if v not in g[k]:
                g[k].append(v)
    cmds = []
    for (exp, sel, ovr), g in groups.items():
        cmds.append([sys.executable, "-m", "xmx.run", "-m", f"experiment={exp}", f"selection={sel}",
                     "data=" + ",".join(g["data"]), "shots=" + ",".join(map(str, g["shots"])),
                     "seed=" + ",".join(map(str, g["seed"])), *ovr, *user_overrides])
    return cmds


def reference_rows(table: dict, references=()):
    """The published numbers of ``table``: the shipped references plus any user files (the report's form)."""
    import pandas as pd

    from xmx.report.gather import norm_name
    from xmx.report.references import load_references
    refs = pd.concat([load_references()] + [load_references(r) for r in references], ignore_index=True)
    spec = table["references"]
    sel = refs[refs.table == spec["table"]]
    if spec.get("methods"):
        wanted = {norm_name(m) for m in spec["methods"]}
        sel = sel[[bool(ms & wanted) for ms in sel.methods]]
    if spec.get("source"):
        sel = sel[sel.source.str.contains(spec["source"], regex=False)]
    return sel.reset_index(drop=True)


def comparison(table: dict, results: list[Path], references=()) -> list[dict]:
    """One row per published number: the reference, our cell(s) that match it (method, dataset, column, backbone),
    and the difference. Rows without a run of ours say so."""
    from xmx.report.references import compare
    refs = reference_rows(table, references)
    cells = None
    if results:
        from xmx.report.gather import assign_variants, load_runs, observations, swept_keys
        from xmx.report.tables import aggregate
        runs, _ = load_runs(results)
        if not runs.empty:
            runs, _ = assign_variants(runs, swept_keys(runs))
            cells = aggregate(observations(runs))
    rows = []
    for i in range(len(refs)):
        r = refs.iloc[i]
        hits = compare(cells, refs.iloc[[i]]) if cells is not None else None
        base = {"method": r.method, "dataset": r.dataset, "column": r.column, "published": r.value,
                "source": r.source}
        if hits is None or hits.empty:
            rows.append({**base, "ours": None, "ours_text": "–", "diff": None, "label": ""})
        for h in ([] if hits is None else hits.itertuples()):
            rows.append({**base, "ours": h.ours, "ours_text": h.ours_text, "diff": h.diff, "label": h.label})
    return rows


def format_comparison(name: str, table: dict, rows: list[dict], n_results: int, n_jobs: int) -> str:
    out = [f"## {table['title']}", "",
           f"{n_results} of {n_jobs} jobs of `{name}` have results. † = selection: paper (selected on test, as the "
           "authors' code).", "",
           "| method | dataset | column | published | ours | ours − published | our row |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        diff = "–" if r["diff"] is None else f"{r['diff']:+.2f}"
        out.append(f"| {r['method']} | {r['dataset']} | {r['column']} | {r['published']:.2f} | {r['ours_text']} | "
                   f"{diff} | {r['label']} |")
    if not rows:
        out.append("| (no published numbers for this table in xmx/references.yaml yet) | | | | | | |")
    sources = sorted({r["source"] for r in rows})
    if sources:
        out += ["", "Published: " + "; ".join(sources)]
    return "\n".join(out)


def show(name: str, table: dict, user_overrides=(), p: Plan | None = None, references=()) -> str:
    p = p or plan(table, user_overrides)
    results = sorted(set(p.done.values()))
    return format_comparison(name, table, comparison(table, results, references), len(p.done), len(p.jobs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xmx.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["list", "plan", "run", "show"])
    ap.add_argument("table", nargs="?", help="a table of xmx/paper_tables.yaml (python -m xmx.tables list)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (e.g. trainer=gpu)")
    ap.add_argument("--dry-run", action="store_true", help="run: print the commands instead of running them")
    ap.add_argument("--references", action="append", default=[], metavar="FILE",
                    help="extra reference numbers (YAML or CSV, the form of xmx/references.yaml)")
    args = ap.parse_args(argv)
    try:
        tables = load_tables()
        if args.command == "list":
            for name, t in tables.items():
                jobs = grid(t)
                print(f"{name}: {len(jobs)} jobs, {len(reference_rows(t, args.references))} published numbers - "
                      f"{t['title']}")
            return 0
        if not args.table:
            raise XmxError(f"python -m xmx.tables {args.command} needs a table name; valid choices: "
                           f"{', '.join(tables)}")
        table = get_table(args.table, tables)
        p = plan(table, args.overrides)
        print("\n".join(p.lines(args.table, table)))
        if args.command == "run":
            cmds = launch_commands(p, args.overrides)
            if not cmds:
                print("nothing to run: every job whose data and preset are present is complete")
            failed = 0
            for cmd in cmds:
                print("$ python " + " ".join(cmd[1:]), flush=True)
                if not args.dry_run:
                    failed += subprocess.run(cmd).returncode != 0
            if args.dry_run:
                return 0
            p = plan(table, args.overrides)
            if failed:
                print(f"{failed} of {len(cmds)} multiruns reported failed jobs (see their sweep lines above)")
        if args.command in ("run", "show"):
            print()
            print(show(args.table, table, args.overrides, p, args.references))
    except XmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
