"""``python -m xmx.tables``: the exact grid of a published table, the plan (jobs, done, missing data), the launch
commands, and the comparison with the published numbers after a (tiny, synthetic) job ran."""

from __future__ import annotations

import sys

import yaml

from xmx.run import run
from xmx.tables import Job, Plan, comparison, format_comparison, get_table, grid, launch_commands, plan, show


def test_tip_adapter_table_is_exactly_its_published_grid():
    t = get_table("tip_adapter_fewshot")
    jobs = grid(t)
    by = {}
    for j in jobs:
        by.setdefault(j.experiment, []).append(j)
    assert len(jobs) == 11 + 3 * 11 * 5  # zero-shot once per dataset; three methods x 11 datasets x 5 shot counts
    assert {j.seed for j in jobs} == {1}  # the released log is seed 1
    assert {j.selection for e in ("tip_adapter_16shot", "tip_adapter_f_16shot") for j in by[e]} == {"paper"}
    assert {j.selection for j in by["zeroshot_16shot"]} == {"val"}
    assert sorted({j.shots for j in by["tip_adapter_f_16shot"]}) == [1, 2, 4, 8, 16]
    inet = [j for j in by["zeroshot_16shot"] if j.dataset == "imagenet"][0]
    assert "data.templates=tip7" in inet.overrides and "backbone=clip_rn50" in inet.overrides


def test_launch_commands_cover_runnable_jobs_only():
    jobs = [Job("tip_adapter_16shot", d, s, 1, "paper") for d in ("dtd", "eurosat", "imagenet") for s in (1, 2)]
    jobs.append(Job("zeroshot_16shot", "imagenet", 16, 1, "val", ["data.templates=tip7"]))
    runnable = [i for i, j in enumerate(jobs) if j.dataset != "eurosat"]  # eurosat: missing under $DATA
    p = Plan(jobs, {}, {"eurosat": "/data/eurosat"}, [], runnable)
    cmds = launch_commands(p, ["trainer=gpu"])
    assert [c[:4] for c in cmds] == [[sys.executable, "-m", "xmx.run", "-m"]] * 2
    assert cmds[0][4:] == ["experiment=tip_adapter_16shot", "selection=paper", "data=dtd,imagenet", "shots=1,2",
                           "seed=1", "trainer=gpu"]
    assert cmds[1][4:] == ["experiment=zeroshot_16shot", "selection=val", "data=imagenet", "shots=16", "seed=1",
                           "data.templates=tip7", "trainer=gpu"]


def test_plan_counts_done_and_missing_then_show_compares(make_cfg, tmp_path, monkeypatch, one_thread):
    logs, data = tmp_path / "logs", tmp_path / "DATA"
    monkeypatch.setenv("DATA", str(data))  # an empty $DATA: every real dataset is missing
    table = {"title": "toy table", "datasets": ["synthetic", "dtd"], "seeds": [1], "shots": [1, 2], "selection": "paper",
             "references": {"table": "fewshot", "methods": ["tip_adapter"]},
             "jobs": [{"experiment": "tip_adapter_16shot"}]}
    small = ["backbone=tiny", "augment.views=1", "method.n_beta=3", "method.n_alpha=2", "trainer.accelerator=cpu",
             f"paths.log_dir={logs}", f"paths.cache_dir={make_cfg().paths.cache_dir}"]
    # synthetic is generated in the cache (its data.root); dtd is looked up under $DATA
    p = plan(table, small)
    assert len(p.jobs) == 4 and not p.done and p.missing_data == {"dtd": str(data / "dtd")}
    assert [(p.jobs[i].dataset, p.jobs[i].shots) for i in p.runnable] == [("synthetic", 1), ("synthetic", 2)]
    assert "4 jobs (tip_adapter_16shot), 0 already done, 2 to run" in "\n".join(p.lines("toy", table))

    # the 2-shot job, run as xmx.run composes it, is the plan's job (the plan composes shots=1 and sets shots=2)
    job = p.jobs[p.runnable[1]]
    res = run(make_cfg(job.args() + small, output_dir=logs / "toy" / "0"))
    assert res["selection"] == "paper"
    p2 = plan(table, small)
    assert list(p2.done) == [p.runnable[1]] and p2.runnable == [p.runnable[0]]

    refs = tmp_path / "refs.yaml"
    refs.write_text(yaml.safe_dump([{"table": "fewshot", "method": "tip_adapter", "dataset": "synthetic",
                                     "column": "2", "value": 50.0, "source": "toy paper"}]))
    rows = [r for r in comparison(table, list(p2.done.values()), [refs]) if r["source"] == "toy paper"]
    assert len(rows) == 1 and rows[0]["diff"] == rows[0]["ours"] - 50.0 == res["metrics"]["test/acc"] - 50.0
    assert "†" in rows[0]["label"]
    text = show("toy", table, small, p2, [refs])
    assert "| tip_adapter | synthetic | 2 | 50.00 |" in text and f"{res['metrics']['test/acc'] - 50:+.2f}" in text
    assert "1 of 4 jobs of `toy` have results" in text
    # published rows with no run of ours are still listed (the shipped RN50 numbers: our run is a tiny backbone)
    assert "| tip_adapter | average | 16 | 70.32 | – | – |" in text
    assert format_comparison("x", {"title": "t"}, [], 0, 0).count("no published numbers") == 1
