"""bench/gpu_all.py: finds every GPU benchmark by its declaration, runs them in one process tree within one budget,
isolates failures, kills overruns with their children, and writes the rows for docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

from conftest import load_bench

REPO = Path(__file__).resolve().parents[1]


def test_every_pending_gpu_benchmark_declares_itself():
    gpu_all = load_bench("gpu_all")
    found = {b["name"]: b for b in gpu_all.discover()}
    assert {"extract", "train_mma", "train_tip", "xadapter"} <= set(found)
    assert "index_imagenet" not in found  # a CPU benchmark
    for b in found.values():
        assert "--smoke" in b["smoke"] and b["budget_s"] > 0
        options = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", Path(b["path"]).read_text()))
        for arg in b["command"] + b["smoke"]:  # every option it will be called with exists in its argparse
            assert not arg.startswith("--") or arg in options, (b["name"], arg)
    # every script docs/benchmarks.md says has GPU figures pending is one gpu_all runs
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    pending = set()
    for section in re.split(r"\n## ", docs):
        if "GPU figures pending" in section:
            pending |= set(re.findall(r"bench/(\w+)\.py", section.split("\n", 1)[0]))
    pending.discard("gpu_all")  # the runner itself
    assert pending and pending <= set(found), pending - set(found)


def _script(folder: Path, name: str, body: str, budget: float, smoke_budget: float) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""\
        import json, os, subprocess, sys, time
        GPU_COMMAND = ["--out", "{{out}}/bench.json"]
        GPU_BUDGET_S = {budget}
        SMOKE_BUDGET_S = {smoke_budget}
        out = sys.argv[sys.argv.index("--out") + 1]
        """) + textwrap.dedent(body))


def test_runs_all_within_budget_isolates_failures_and_kills_overruns(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "helper.py").write_text("X = 1\n")  # no declaration: not a GPU benchmark
    _script(bench, "quick", """\
        json.dump({"summary": "42 things/s (target 40)", "rate": 42.0}, open(out, "w"))
        """, budget=10, smoke_budget=0.5)
    _script(bench, "broken", """\
        import open_clip_that_is_not_installed
        """, budget=20, smoke_budget=1)
    _script(bench, "hangs", f"""\
        child = subprocess.Popen(["sleep", "300"])
        open({str(tmp_path / 'grandchild.pid')!r}, "w").write(str(child.pid))
        time.sleep(300)
        """, budget=30, smoke_budget=2)
    _script(bench, "huge", """\
        json.dump({"rate": 1.0}, open(out, "w"))
        """, budget=40, smoke_budget=500)
    gpu_all = load_bench("gpu_all")
    assert gpu_all.main(["--bench-dir", str(bench), "--list"]) == 0
    listed = capsys.readouterr().out
    assert [ln.split()[0] for ln in listed.splitlines()[:-1]] == ["quick", "broken", "hangs", "huge"]
    t0 = time.monotonic()
    code = gpu_all.main(["--bench-dir", str(bench), "--smoke", "--budget", "8", "--out", str(tmp_path / "out")])
    took = time.monotonic() - t0
    assert code == 1 and took < 20  # the 8 s budget bounds it (plus process start-up on a loaded machine)
    rec = json.loads((tmp_path / "out" / "gpu_all.json").read_text())
    rows = {r["name"]: r for r in rec["benchmarks"]}
    assert [r["name"] for r in rec["benchmarks"]] == ["quick", "broken", "hangs", "huge"]
    assert rows["quick"]["status"] == "ok" and rows["quick"]["summary"] == "42 things/s (target 40)"
    assert rows["broken"]["status"] == "failed"
    assert "missing module open_clip_that_is_not_installed" in rows["broken"]["reason"]
    assert rows["hangs"]["status"] == "timeout" and rows["hangs"]["seconds"] < 9
    assert rows["huge"]["status"] == "not run" and "--only huge" in rows["huge"]["reason"]
    pid = int((tmp_path / "grandchild.pid").read_text())  # the overrun's own child went with it
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/status").read_text()
        assert "\nState:\tZ" in state, "the grandchild of a killed benchmark is still running"
    except FileNotFoundError:
        pass
    md = (tmp_path / "out" / "benchmarks_rows.md").read_text()
    assert "| date | device | command | result |" in md
    assert "`python bench/quick.py --smoke --out OUT/bench.json` | 42 things/s (target 40)" in md
    assert "| timeout: killed after" in md and "| not run:" in md
    assert (tmp_path / "out" / "broken.log").read_text().count("ModuleNotFoundError") == 1
    assert os.path.isdir(tmp_path / "out" / "quick")
    assert gpu_all.main(["--bench-dir", str(bench), "--only", "nope"]) == 2
