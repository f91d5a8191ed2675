"""xmx.report: hand-made results.json files → tables, CSV, comparisons and plots (all in-process, no training)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from xmx.errors import XmxError
from xmx.report import build_report, load_references, main

_counter = iter(range(10**6))


def write_result(root: Path, *, method="tip_adapter", dataset="dtd", protocol="fewshot", shots=16, seed=1,
                 metrics=None, acc=None, experiment=None, arch="RN50", config=None, status="complete",
                 folder=None, mtime=None, **extra) -> Path:
    """A schema-conformant results.json (architecture.md) in its own run folder; returns the file."""
    metrics = dict(metrics or {})
    if acc is not None:
        metrics["test/acc"] = acc
    cfg = {"seed": seed, "data": {"name": dataset, "subset_seed": seed}, "protocol": {"name": protocol, "shots": shots},
           "method": {"_target_": f"xmx.methods.{method}"}, "paths": {"output_dir": f"/tmp/out/{next(_counter)}"}}
    for k, v in (config or {}).items():  # dotted keys
        d = cfg
        *head, last = k.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    rec = {"schema": "xmx.results/1", "status": status, "experiment": experiment or f"{method}_{protocol}",
           "method": method, "dataset": dataset, "protocol": protocol, "shots": shots, "seed": seed,
           "metrics": metrics, "extra": {},
           "data": {"root": "/data", "subset_file": "subset.json", "splits": {}},
           "weights": {"name": arch, "arch": arch, "source": "test", "file": None, "sha256": None,
                       "random_init": False, "quick_gelu": True, "precision": "fp32"},
           "code": {"xmx": "0.1.0", "git_commit": None, "git_dirty": None}, "packages": {},
           "cost": {"wall_time_s": 1.0, "device": "cpu", "peak_memory_mb": 1.0},
           "predictions": "predictions.safetensors", "config": cfg}
    if status is None:
        del rec["status"]
    rec.update(extra)
    run = root / (folder or f"{method}_{dataset}_{protocol}_{shots}_{seed}_{next(_counter)}")
    run.mkdir(parents=True, exist_ok=True)
    path = run / "results.json"
    path.write_text(json.dumps(rec))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def cell(cells: pd.DataFrame, **where) -> pd.Series:
    sel = cells
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"{where}: {len(sel)} cells\n{cells[list(where)]}"
    return sel.iloc[0]


def test_fewshot_means_stds_incomplete_and_csv_round_trip(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, acc in zip((1, 2, 3), (70.0, 72.0, 74.0)):
        write_result(runs / "a", dataset="dtd", seed=seed, acc=acc)
    for seed, acc in zip((1, 2), (60.0, 62.0)):  # seed 3 never finished
        write_result(runs / "b", dataset="oxford_pets", seed=seed, acc=acc)
    for seed, acc in zip((1, 2, 3), (50.0, 51.0, 55.0)):
        write_result(runs / "c", dataset="dtd", shots=1, seed=seed, acc=acc)
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--no-plots"]) == 0
    stdout = capsys.readouterr().out

    cells = pd.read_csv(out / "cells.csv", keep_default_na=False, na_values=[""])
    c = cell(cells, table="fewshot", dataset="DTD", column=16)
    assert c["mean"] == pytest.approx(72.0) and c["std"] == pytest.approx(2.0)
    assert c.text == "72.00 ± 2.00" and bool(c.complete) and c.seeds == "1,2,3"
    p = cell(cells, table="fewshot", dataset="OxfordPets", column=16)
    assert p["mean"] == pytest.approx(61.0) and p["std"] == pytest.approx(math.sqrt(2))
    assert p.text == "61.00 ± 1.41 (2/3 seeds)" and not bool(p.complete)
    # the average at 16 shots: mean of the dataset means, flagged because one dataset lacks a seed
    a = cell(cells, table="fewshot", dataset="average", column=16)
    assert a["mean"] == pytest.approx((72.0 + 61.0) / 2) and not bool(a.complete) and "2/3 seeds" in a.text
    # std of the average over the seeds that cover every dataset (1 and 2): averages 65, 67
    assert a["std"] == pytest.approx(math.sqrt(2))
    # 1 shot was run on DTD only: its average lacks OxfordPets
    a1 = cell(cells, table="fewshot", dataset="average", column=1)
    assert a1["mean"] == pytest.approx(52.0) and "1/2 datasets" in a1.text and not bool(a1.complete)
    assert "72.00 ± 2.00" in (out / "report.md").read_text() and "72.00 ± 2.00" in stdout
    # per-table CSV equals the rows of cells.csv
    fs = pd.read_csv(out / "fewshot.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(fs.reset_index(drop=True),
                                  cells[cells.table == "fewshot"].reset_index(drop=True), check_dtype=False)
    md16 = (out / "fewshot_16shot.md").read_text()
    assert md16.index("OxfordPets") < md16.index("DTD") < md16.index("Average")  # the papers' order


def test_expected_seeds_from_cli(tmp_path):
    for seed, acc in zip((1, 2), (70.0, 72.0)):
        write_result(tmp_path / "r", seed=seed, acc=acc)
    res = build_report([tmp_path / "r"], out=tmp_path / "o", seeds=[1, 2, 3], plots=False)
    c = cell(res["cells"], table="fewshot", dataset="DTD", column="16")
    assert c.text == "71.00 ± 1.41 (2/3 seeds)" and c.expected == "1,2,3"


def test_base_to_new_hm_from_means(tmp_path):
    r = tmp_path / "b2n"
    # DTD: base 80/82, new 60/64 → means 81 / 62; EuroSAT: base 90/90, new 40/50 → 90 / 45
    for ds, seed, b, n in [("dtd", 1, 80, 60), ("dtd", 2, 82, 64), ("eurosat", 1, 90, 40), ("eurosat", 2, 90, 50)]:
        write_result(r, method="mma", dataset=ds, protocol="base2new", seed=seed, arch="ViT-B-16",
                     metrics={"test_base/acc": b, "test_new/acc": n, "hm": 2 * b * n / (b + n)})
    # docs/protocols.md#base-to-new: HM(69.34, 74.22) = 71.70
    write_result(r, method="zeroshot", dataset="dtd", protocol="base2new", seed=1, arch="ViT-B-16",
                 metrics={"test_base/acc": 69.34, "test_new/acc": 74.22})
    res = build_report([r], out=tmp_path / "o", plots=False)
    cells = res["cells"]
    hm = lambda b, n: 2 * b * n / (b + n)  # noqa: E731
    assert cell(cells, label="mma", dataset="DTD", column="base")["mean"] == pytest.approx(81)
    assert cell(cells, label="mma", dataset="DTD", column="hm")["mean"] == pytest.approx(hm(81, 62))
    assert cell(cells, label="mma", dataset="DTD", column="hm")["mean"] != pytest.approx(
        (hm(80, 60) + hm(82, 64)) / 2)  # not the mean of per-seed HMs
    avg_b = cell(cells, label="mma", dataset="average", column="base")["mean"]
    avg_n = cell(cells, label="mma", dataset="average", column="new")["mean"]
    assert (avg_b, avg_n) == (pytest.approx(85.5), pytest.approx(53.5))
    assert cell(cells, label="mma", dataset="average", column="hm")["mean"] == pytest.approx(hm(85.5, 53.5))
    z = cell(cells, label="zeroshot", dataset="DTD", column="hm")
    assert z.text == "71.70"
    titles = [t for _, t, _ in res["tables"]]
    assert "Base-to-new: average over 2 datasets" in titles and "Base-to-new: DTD" in titles
    avg_table = dict((s, w) for s, _, w in res["tables"])["base2new_average"]
    assert list(avg_table.columns) == ["Base", "New", "HM"]
    # zero-shot ran on DTD only: its average is marked as lacking a dataset
    assert "1/2 datasets" in avg_table.loc["zeroshot", "HM"]


def test_skipped_runs_are_listed_not_averaged(tmp_path, capsys):
    r = tmp_path / "runs"
    write_result(r, seed=1, acc=70.0)
    write_result(r, seed=2, acc=72.0)
    write_result(r, seed=3, acc=10.0, status="running", folder="unfinished")
    write_result(r, seed=3, acc=10.0, status=None, folder="nostatus")
    (r / "corrupt").mkdir()
    (r / "corrupt" / "results.json").write_text('{"schema": "xmx.results/1", "status": "comp')
    write_result(r, seed=3, metrics={"val/acc": 50.0}, folder="nometric")
    out = tmp_path / "o"
    assert main([str(r), "--out", str(out), "--no-plots"]) == 0
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(skipped.path.map(lambda p: Path(p).parent.name), skipped.reason))
    assert set(reasons) == {"unfinished", "nostatus", "corrupt", "nometric"}
    assert "running" in reasons["unfinished"] and "None" in reasons["nostatus"]
    assert "not valid JSON" in reasons["corrupt"] and "test/acc" in reasons["nometric"]
    c = cell(pd.read_csv(out / "cells.csv"), dataset="DTD", column=16)
    assert c["mean"] == pytest.approx(71.0) and c.seeds == "1,2"  # seed 3 never averaged
    md = (out / "report.md").read_text()
    assert "## Skipped runs" in md and "not valid JSON" in md


def test_duplicates_keep_the_newest(tmp_path):
    now = time.time()
    write_result(tmp_path / "r", seed=1, acc=10.0, mtime=now - 100)
    newest = write_result(tmp_path / "r", seed=1, acc=70.0, mtime=now)
    res = build_report([tmp_path / "r"], out=tmp_path / "o", plots=False)
    assert cell(res["cells"], dataset="DTD", column="16")["mean"] == pytest.approx(70.0)
    assert len(res["skipped"]) == 1 and str(newest) in res["skipped"].reason.iloc[0]


def test_compare_with_shipped_and_user_references(tmp_path, capsys):
    r = tmp_path / "r"
    write_result(r, method="tip_adapter", dataset="dtd", seed=1, acc=71.32)
    write_result(r, method="tip_adapter", dataset="dtd", seed=1, acc=40.0, arch="ViT-B-16")  # other backbone
    write_result(r, method="my_new_method", dataset="dtd", seed=1, acc=80.0)
    user = tmp_path / "refs.yaml"
    user.write_text("references:\n  - {table: fewshot, method: my-new-method, dataset: DTD, column: '16', "
                    "value: 79.5, source: 'our lab notebook'}\n")
    out = tmp_path / "o"
    assert main([str(r), "--out", str(out), "--no-plots", "--compare", "--references", str(user)]) == 0
    stdout = capsys.readouterr().out
    cmp = pd.read_csv(out / "compare.csv")
    tip = cmp[cmp.label.str.startswith("tip_adapter")]
    assert len(tip) == 1  # the ViT-B-16 run is not compared with RN50 numbers
    t = tip.iloc[0]
    assert (t.dataset, t.column, t.reference) == ("average", 16, 70.32)
    assert t["diff"] == pytest.approx(1.0) and t.source == "Tip-Adapter log: seed 1, test-selected"
    assert t.note == "ours averages 1 datasets, the reference 11"  # a 1-dataset mean is not the 11-dataset one
    mine = cmp[cmp.source == "our lab notebook"].iloc[0]
    assert mine.label == "my_new_method [RN50]" and mine["diff"] == pytest.approx(0.5)
    assert "+1.00" in stdout and "Tip-Adapter log: seed 1, test-selected" in stdout and "+0.50" in stdout
    assert "## Comparison with references" in (out / "report.md").read_text()


def test_shipped_references_are_labelled():
    refs = load_references()
    assert (refs.source != "").all()
    hm = refs[(refs.table == "base2new") & (refs.method == "cocoop") & (refs.column == "hm")]
    assert hm.value.tolist() == [75.83] and hm.source.iloc[0] == "CoCoOp paper"
    tipf = refs[(refs.method == "tip_adapter_f")].set_index("column").value
    assert tipf.to_dict() == {"16": 75.83, "8": 72.45, "4": 69.67, "2": 66.65, "1": 64.60}
    assert refs[refs.method == "xmadapter"].value.tolist() == [76.87]
    assert sorted(refs[refs.table == "colour"].value) == [30.7, 31.6, 60.0, 64.1]
    lora = refs[refs.method == "clip_lora"]  # HALoRA Table 5, CLIP-LoRA rows: 1/4/16 shots x (11 datasets + mean)
    assert len(lora) == 36 and set(lora.column) == {"1", "4", "16"} and lora.source.str.contains("HALoRA").all()
    avg = lora[lora.dataset == "average"].set_index("column")
    assert avg.value.to_dict() == {"1": 72.5, "4": 77.4, "16": 83.0} and (avg.n_datasets == 11).all()
    assert lora[(lora.dataset == "Flowers102") & (lora.column == "16")].value.tolist() == [98.0]
    taskres = refs[refs.method == "taskres"]  # third-party: HC paper Tables 5 (RN50 few-shot) and 2 (domain shift)
    assert len(taskres) == 79 and taskres.source.str.contains("not the TaskRes paper|HC authors").all()
    assert taskres[(taskres.table == "fewshot") & (taskres.dataset == "ImageNet")].set_index("column").value.to_dict() \
        == {"1": 61.44, "2": 62.28, "4": 62.78, "8": 64.30, "16": 65.41}
    lpp = refs[refs.method == "lpp"].set_index("column").value  # third-party: HealthX-Lab/CLIP-SVD README
    assert lpp.to_dict() == {"1": 70.35, "2": 72.93, "4": 75.77, "8": 77.94, "16": 80.32}


def test_bad_reference_file_and_bad_folders(tmp_path, capsys):
    with pytest.raises(XmxError, match="entry 1: missing value, source"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("- {table: fewshot, method: x, dataset: dtd, column: '16'}\n")
        load_references(bad)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no results.json found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    write_result(tmp_path / "only_bad", status="failed", acc=1.0)
    with pytest.raises(XmxError, match="none of the 1 results.json"):
        build_report([tmp_path / "only_bad"], out=tmp_path / "o", plots=False)
    assert not (tmp_path / "o").exists()


def test_domain_shift_glue_and_colour_tables(tmp_path):
    r = tmp_path / "r"
    for seed, base in ((1, 60.0), (2, 62.0)):
        write_result(r, method="xmadapter", dataset="imagenet", protocol="domain_shift", seed=seed,
                     metrics={"test/acc": base, "test_imagenetv2/acc": base - 10, "test_imagenet_sketch/acc": 30.0,
                              "test_imagenet_a/acc": 20.0, "test_imagenet_r/acc": 50.0})
    write_result(r, method="xmadapter", dataset="imagenet", protocol="transfer", seed=1,
                 metrics={"test/acc": 60.0, "test_caltech101/acc": 90.0, "test_dtd/acc": 40.0})
    write_result(r, method="xadapter", dataset="cola", protocol="glue", shots=0, arch="bert-base-uncased",
                 metrics={"test/mcc": 50.0, "test/acc": 80.0})
    write_result(r, method="xadapter", dataset="mrpc", protocol="glue", shots=0, arch="bert-base-uncased",
                 metrics={"test/f1": 88.0, "test/acc": 84.0})
    write_result(r, method="xadapter", dataset="memory_color", protocol="colour_probe", shots=0,
                 arch="bert-base-uncased", acc=63.1)
    res = build_report([r], out=tmp_path / "o", plots=False, do_compare=True)
    cells, tables = res["cells"], dict((s, w) for s, _, w in res["tables"])
    ds = tables["domain_shift_imagenet"]
    assert list(ds.columns) == ["ImageNet (source)", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R",
                                "Average"]
    assert ds.loc["xmadapter", "ImageNet (source)"] == "61.00 ± 1.41"
    assert cell(cells, table="domain_shift", column="average")["mean"] == pytest.approx((51 + 30 + 20 + 50) / 4)
    cd = tables["cross_dataset_imagenet"]
    assert list(cd.columns) == ["ImageNet (source)", "Caltech101", "DTD", "Average"]
    assert cd.loc["xmadapter", "Average"] == "65.00"
    glue = tables["glue"]
    assert glue.loc["xadapter", "CoLA matthews"] == "50.00" and glue.loc["xadapter", "MRPC f1"] == "88.00"
    assert glue.loc["xadapter", "GLUE score"] == f"{((50 + 80) / 2 + (88 + 84) / 2) / 2:.2f}"
    assert tables["colour"].loc["xadapter", "MemoryColor"] == "63.10"
    c = res["compare"]
    assert c[c.table == "colour"].iloc[0][["reference", "source"]].tolist() == [
        64.1, "X-adapter paper via LaMI table (BERT-base + X-adapter)"]


def test_plots_sweeps_and_latex(tmp_path):
    r = tmp_path / "multirun"
    for i, lam in enumerate((0.1, 0.2, 0.3)):  # a λ sweep: same method/dataset/shots/seed, method.lam differs
        for seed in (1, 2):
            write_result(r / str(i), method="mma", dataset="dtd", protocol="fewshot", seed=seed,
                         acc=60 + 10 * lam + seed, config={"method.lam": lam}, folder=f"{seed}")
    for shots in (1, 2, 4, 8, 16):
        write_result(r / "tip", method="tip_adapter", dataset="dtd", shots=shots, acc=50.0 + shots)
    out = tmp_path / "o"
    assert main([str(r), "--out", str(out), "--latex"]) == 0
    cells = pd.read_csv(out / "cells.csv")
    labels = set(cells.label)
    assert {"mma {method.lam=0.1}", "mma {method.lam=0.2}", "mma {method.lam=0.3}", "tip_adapter"} <= labels
    assert cell(cells, label="mma {method.lam=0.2}", dataset="DTD", column=16)["mean"] == pytest.approx(63.5)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "fewshot_dtd.png" in plots and "fewshot_average.png" in plots
    assert "sweep_fewshot_mma_mma_fewshot_method_lam.png" in plots
    for p in (out / "plots").iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    tex = (out / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"method.lam=0.2\}" in tex
    # --param names the key explicitly; an unknown key is an error naming it
    assert main([str(r), "--out", str(out), "--param", "method.lam", "--no-plots"]) == 0
    with pytest.raises(XmxError, match="--param method.gamma"):
        build_report([r], out=out, params=["method.gamma"], plots=False)
