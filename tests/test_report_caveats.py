"""Reports never let a number from random-init weights or synthetic data pass as an accuracy (issue 12, item 7), and
the colour probe is a colour row, not a cross-dataset transfer row."""

from __future__ import annotations

import io

from PIL import Image

from test_report import write_result
from xmx.report import build_report


def _caveat(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).text.get("xmx:caveat", "")


def test_random_init_and_synthetic_runs_are_marked_in_markdown_and_on_every_plot(tmp_path):
    r = tmp_path / "runs"
    for shots in (1, 16):
        for seed in (1, 2):
            write_result(r, method="tip_adapter", dataset="dtd", shots=shots, seed=seed, acc=60.0 + shots + seed)
            rand = write_result(r, method="tip_adapter", dataset="synthetic", shots=shots, seed=seed, acc=9.0,
                                arch="xmx-tiny")
            text = rand.read_text().replace('"random_init": false', '"random_init": true')
            rand.write_text(text)
            for c in (0.1, 1.0):  # a sweep of method.C on a fake tree
                write_result(r, method="linear_probe", dataset="dtd", shots=shots, seed=seed, acc=55.0 + seed + c,
                             data={"root": "/fake", "splits": {}, "synthetic": True}, config={"method.C": c})
    res = build_report([r], out=tmp_path / "report")
    md = res["markdown"]
    assert "**Not accuracies:** 12 of 16 runs use random-init weights and/or synthetic data" in md
    rows = {ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ")}
    assert any(x.startswith("tip_adapter") and "⚠" not in x for x in rows)  # the real run stays clean
    assert any("⚠ random-init weights + synthetic data" in x for x in rows)
    assert any(x.startswith("linear_probe") and x.endswith("⚠ synthetic data") for x in rows)
    fewshot_md = (tmp_path / "report" / "fewshot_16shot.md").read_text()
    assert fewshot_md.startswith("> **Not accuracies:**")
    plots = {p.name: p.read_bytes() for p in (tmp_path / "report" / "plots").glob("*.png")}
    assert _caveat(plots["fewshot_dtd.png"]) == "synthetic data"
    assert _caveat(plots["fewshot_synthetic.png"]) == "random-init weights + synthetic data"
    sweeps = [n for n in plots if n.startswith("sweep_")]
    assert sweeps and all(_caveat(plots[n]) == "synthetic data" for n in sweeps)
    # the generated demo set is never averaged with other datasets (reported apart): the average figure draws only
    # the fake-tree linear-probe rows and the real tip_adapter row
    assert _caveat(plots["fewshot_average.png"]) == "synthetic data"


def test_a_real_only_report_has_no_caveat(tmp_path):
    r = tmp_path / "runs"
    write_result(r, method="tip_adapter", dataset="dtd", shots=16, seed=1, acc=66.0)
    res = build_report([r], out=tmp_path / "report")
    assert "Not accuracies" not in res["markdown"] and "⚠" not in res["markdown"]
    assert _caveat((tmp_path / "report" / "plots" / "fewshot_dtd.png").read_bytes()) == "none"


def test_the_colour_probe_is_a_colour_row_not_a_transfer_row(tmp_path):
    r = tmp_path / "runs"
    write_result(r, method="xadapter_color", dataset="object_color", protocol="zeroshot_probe", shots=0,
                 metrics={"test_memory_color/acc": 62.5, "test_color_terms/acc": 58.0})
    res = build_report([r], out=tmp_path / "report", plots=False)
    assert set(res["cells"].table) == {"colour"}
    assert "Cross-dataset" not in res["markdown"]
    tables = {stem: w for stem, _, w in res["tables"]}
    assert tables["colour"].loc["xadapter_color", "MemoryColor"] == "62.50"
    assert tables["colour"].loc["xadapter_color", "ColorTerms"] == "58.00"
