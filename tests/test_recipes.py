"""Every preset equals its release, setting by setting (xmx/recipes/<method>.yaml), and the reference file adds up.

The table-driven test composes every preset a recipe table names with every dataset the preset supports (and, for
few-shot presets, every shot count of ``sweep=shots``) and fails when a resolved value differs from its row (``xmx``
when the row names a deviation, else ``release``). ``test_a_drifting_preset_fails`` shows it failing on broken copies.
Below: one test per item of issue 21 that is behaviour rather than a config value.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from xmx.config import config_dir
from xmx.errors import XmxError
from xmx.recipes import (
    check,
    context,
    load_recipes,
    preset_deviations,
    recipe_record,
    rows_for,
)

DATASETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
            "eurosat", "ucf101", "imagenet"]
SHOTS = [1, 2, 4, 8, 16]
NOT_A_RECIPE = {"demo": "the synthetic pipeline demo (tiny random-init CLIP): no release to reproduce"}
RECIPES = load_recipes()
TIP7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
        "art of the {}.", "a photo of the small {}."]


# ---- composing presets (no run) ----------------------------------------------------------------------------------
class Presets:
    """Each preset composed once; other datasets and shot counts are the same composition with ``data.name`` /
    ``shots`` set (every data/<name>.yaml of the 11 datasets sets only its name: checked below), as xmx.tables does."""

    def __init__(self):
        self._cache: dict = {}

    def base(self, preset: str, *overrides: str):
        key = (preset, overrides)
        if key not in self._cache:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                self._cache[key] = compose("config", overrides=[f"experiment={preset}", *overrides])
            GlobalHydra.instance().clear()
        return self._cache[key]

    def case(self, preset: str, dataset: str | None = None, shots: int | None = None, *overrides: str):
        cfg = copy.deepcopy(self.base(preset, *overrides))
        with open_dict(cfg):
            if dataset is not None:
                cfg.data.name = dataset
            if shots is not None:
                cfg.shots = shots
        return cfg

    def cases(self, preset: str):
        """(dataset, shots, cfg) for every dataset and shot count the preset supports."""
        cfg = self.base(preset)
        clip = str(OmegaConf.select(cfg, "data._target_", default="")).endswith("CLIPDataModule")
        protocol = OmegaConf.select(cfg, "protocol.name", default=None)
        if not clip:
            datasets = [cfg.data.name]
        elif protocol in ("domain_shift", "cross_dataset"):
            datasets = ["imagenet"]
        else:
            datasets = DATASETS
        shots = SHOTS if clip and protocol == "fewshot" else [cfg.shots]
        for ds in datasets:
            for k in shots:
                yield ds, k, self.case(preset, ds if clip else None, k)


@pytest.fixture(scope="module")
def presets():
    yield Presets()
    GlobalHydra.instance().clear()


def drift_report(presets: Presets, name: str, table: dict) -> tuple[list[str], set[int]]:
    """Every (preset, dataset, shots) whose resolved config differs from the table; and the rows that matched a case."""
    problems, used = [], set()
    for preset in table["presets"]:
        for ds, k, cfg in presets.cases(preset):
            ctx = context(cfg, preset)
            used |= {id(r) for r in rows_for(table, ctx)}
            drift, _ = check(cfg, table, preset)
            problems += [f"{name}: {preset} data={ds} shots={k}: {d['key']} = {d['resolved']!r}, the table says "
                         f"{d['expected']!r} ({d['source']})" for d in drift]
    return problems, used


# ---- the tables --------------------------------------------------------------------------------------------------
def test_the_eleven_datasets_set_only_their_name():
    for ds in DATASETS:
        body = yaml.safe_load((config_dir() / "data" / f"{ds}.yaml").read_text())
        assert set(body) <= {"defaults", "name"} and body["name"] == ds, ds


def test_every_table_names_a_method_config_and_existing_presets(presets):
    methods = {p.stem for p in (config_dir() / "method").glob("*.yaml")}
    experiments = {p.stem for p in (config_dir() / "experiment").glob("*.yaml")}
    for name, t in RECIPES.items():
        assert t["method"] in methods, f"{name}: no conf/method/{t['method']}.yaml"
        assert set(t["presets"]) <= experiments, f"{name}: unknown presets {set(t['presets']) - experiments}"
        assert {"repo", "commit"} <= set(t["release"]), name
        for preset in t["presets"]:
            assert presets.base(preset).method.name == t["method"], f"{name}: {preset} runs another method"


def test_every_preset_has_a_recipe_table():
    covered = {p for t in RECIPES.values() for p in t["presets"]}
    experiments = {p.stem for p in (config_dir() / "experiment").glob("*.yaml")}
    missing = experiments - covered - set(NOT_A_RECIPE)
    assert not missing, f"presets without a recipe table (xmx/recipes/<method>.yaml): {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_preset_resolves_to_its_recipe(presets, name):
    table = RECIPES[name]
    problems, used = drift_report(presets, name, table)
    assert not problems, "presets drifted from their recipe table:\n" + "\n".join(problems[:40])
    dead = [r["key"] for r in table["settings"] if id(r) not in used]
    assert not dead, f"{name}: rows that match no case of its presets (check `when`): {dead}"


def test_a_drifting_preset_fails(presets, tmp_path):
    """The same check on deliberately broken copies: a table whose release value is wrong, and a preset whose config
    drifted (here: CLIP-LoRA back to each dataset's own template, the slip of issue 21)."""
    table = copy.deepcopy(RECIPES["clip_lora"])
    row = next(r for r in table["settings"] if r["key"] == "method.prompt")
    row["release"] = "a photo of a {}, a type of pet."
    problems, _ = drift_report(presets, "clip_lora (broken copy)", table)
    assert problems and all("method.prompt" in p for p in problems)
    assert len(problems) == sum(1 for _ in presets.cases("clip_lora_16shot")) + 11 + 1  # every case of 3 presets

    cfg = presets.case("clip_lora_16shot", "dtd", 16)
    with open_dict(cfg):
        cfg.method.prompt = None  # the old default: the dataset's own template
    drift, _ = check(cfg, RECIPES["clip_lora"], "clip_lora_16shot")
    assert [d["key"] for d in drift] == ["method.prompt"] and drift[0]["resolved"] is None

    cfg = presets.case("mma_yang_b2n", "imagenet", 16)
    with open_dict(cfg):
        cfg.method.batch_size = 16
    drift, _ = check(cfg, RECIPES["mma_yang"], "mma_yang_b2n")
    assert [d["key"] for d in drift] == ["method.batch_size"] and drift[0]["expected"] == 128


def test_rows_must_say_why_they_deviate(tmp_path):
    bad = {"method": "gda", "release": {"repo": "x/y", "commit": "z"}, "presets": ["gda_16shot"],
           "settings": [{"key": "method.zs_scale", "release": 100.0, "source": "a.py:1", "xmx": 50.0}]}
    (tmp_path / "gda.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(XmxError, match="'xmx' and 'deviation' go together"):
        load_recipes(tmp_path)
    bad["settings"][0] = {"key": "method.zs_scale", "release": 100.0, "source": "a.py:1", "when": {"backbone": "x"}}
    (tmp_path / "gda.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(XmxError, match="when: unknown key"):
        load_recipes(tmp_path)


# ---- results.json and xmx.tables show ----------------------------------------------------------------------------
def test_a_run_records_its_deviations_and_overrides(presets):
    cfg = presets.case("clip_lora_16shot", "dtd", 16)
    rec = recipe_record(cfg)
    assert rec["table"] == "xmx/recipes/clip_lora.yaml" and rec["preset_covered"] and rec["changed"] == []
    assert [d["key"] for d in rec["deviations"]] == ["method.amp"] and rec["deviations"][0]["deviation"]
    with open_dict(cfg):
        cfg.method.optimizer.lr = 1e-3
    rec = recipe_record(cfg)
    assert rec["changed"] == [{"key": "method.optimizer.lr", "expected": 2e-4, "resolved": 1e-3, "release": 2e-4}]
    src = Path(__file__).parents[1] / "xmx" / "run.py"
    assert "recipe_record(cfg)" in src.read_text(), "run.py writes the record into results.json"


def test_tables_show_prints_the_presets_deviations():
    from xmx.tables import deviation_lines, load_tables
    lines = deviation_lines(load_tables()["tip_adapter_fewshot"])
    text = "\n".join(lines)
    assert "tip_adapter_f_16shot" in text and "augment.views" in text and "nothing is chosen on test" in text
    assert preset_deviations("clip_lora_16shot")[0]["key"] == "method.amp"


# ---- the reference file ------------------------------------------------------------------------------------------
def _refs() -> list[dict]:
    return yaml.safe_load((Path(__file__).parents[1] / "xmx" / "references.yaml").read_text())["references"]


def _decimals(v: float) -> int:
    s = repr(float(v))
    return len(s.split(".")[1].rstrip("0")) if "." in s else 0


def test_reference_averages_are_the_mean_of_their_rows():
    """An `average` equals the mean of the rows it averages, to its printed precision (half a unit of its last
    digit): the 4 domain-shift targets, the 10 cross-dataset targets, or the 11 datasets of the same column."""
    refs = _refs()
    groups = defaultdict(dict)
    for r in refs:
        if r["table"] in ("domain_shift", "cross_dataset"):
            groups[("targets", r["table"], r["method"], tuple(r.get("backbone", [])), r["dataset"])][r["column"]] = r
        else:
            groups[("datasets", r["table"], r["method"], tuple(r.get("backbone", [])), r["column"],
                    tuple(r.get("experiment", [])))][r["dataset"]] = r
    checked = 0
    for key, rows in groups.items():
        if key[0] == "targets":
            avg = rows.get("average")
            parts = [r["value"] for c, r in rows.items() if c not in ("average", "ImageNet")]
        else:
            avg = rows.get("average")
            parts = [r["value"] for d, r in rows.items() if d != "average"]
            if avg is not None and len(parts) != avg.get("n_datasets", len(parts)):
                continue  # an average whose datasets are not all shipped (published mean only)
        if avg is None or not parts:
            continue
        mean = sum(parts) / len(parts)
        tol = 0.5 * 10 ** -_decimals(avg["value"]) + 1e-9
        assert abs(avg["value"] - mean) <= tol, (f"{key}: average {avg['value']} but the mean of its "
                                                 f"{len(parts)} rows is {mean:.4f} ({avg['source']})")
        checked += 1
    assert checked >= 10


def test_cocoop_domain_shift_average_and_inferred_backbones_are_labelled():
    refs = _refs()
    cocoop = [r for r in refs if r["table"] == "domain_shift" and r["method"] == "cocoop" and r["column"] == "average"]
    assert [r["value"] for r in cocoop] == [59.91]
    for r in refs:
        if r["method"] == "lpp":
            assert "inferred" in r["source"] and r.get("backbone_inferred") is True, r


def test_every_paper_table_has_reference_rows_for_the_methods_its_presets_run(presets):
    from xmx.report.gather import norm_name as _norm
    from xmx.tables import load_tables, reference_rows
    for name, t in load_tables().items():
        refs = reference_rows(t)
        assert len(refs), f"paper table {name}: no reference rows"
        have = set().union(*refs.methods) if len(refs) else set()
        wanted = {_norm(m) for m in (t["references"].get("methods") or [])}
        for job in t["jobs"]:
            method = presets.base(job["experiment"]).method.name
            if wanted:
                assert _norm(method) in wanted, f"{name}: {job['experiment']} runs {method}, not among {wanted}"
                assert _norm(method) in have, f"{name}: no reference row for {method}"
    tables = load_tables()
    assert [j["experiment"] for j in tables["mma_yang_b2n"]["jobs"]] == ["mma_yang_b2n"]
    assert tables["mma_yang_b2n"]["references"]["methods"] == ["mma_yang"]
    assert all(j["experiment"] != "mma_b2n" or "Yang" not in t["title"] for t in tables.values() for j in t["jobs"])


# ---- issue 21, item by item --------------------------------------------------------------------------------------
def test_clip_lora_prompt_is_the_release_s_on_every_dataset(presets):
    """lora.py formats dataset.template[0], which every datasets/*.py of the release rebinds to 'a photo of a {}.'."""
    from hydra.utils import instantiate
    for preset in ("clip_lora_16shot", "clip_lora_b2n"):
        for ds in DATASETS:
            assert presets.case(preset, ds).method.prompt == "a photo of a {}.", (preset, ds)
    m = instantiate(presets.case("clip_lora_16shot", "dtd").method, _convert_="partial")
    assert m.train_text_prompts(["banded", "water_lilly"], ["{} texture."]) == [["a photo of a banded."],
                                                                               ["a photo of a water lilly."]]


@pytest.mark.parametrize("preset", ["mma_yang_b2n", "mma_yang_16shot"])
def test_mma_yang_imagenet_batch_128_in_the_preset_and_b2n_sweep(presets, preset):
    for sweep in ((), ("sweep=b2n_all",)):
        assert presets.case(preset, "imagenet", None, *sweep).method.batch_size == 128
        assert presets.case(preset, "imagenet", None, *sweep).data.batch_size == 128
        assert presets.case(preset, "dtd", None, *sweep).method.batch_size == 16


def test_selection_images_per_method(presets):
    for ds in ("dtd", "eurosat"):
        assert presets.case("gda_16shot", ds, 4).data.val_shots == "all"
        for preset in ("lpp_16shot", "prolip_16shot"):
            for k in SHOTS:
                assert presets.case(preset, ds, k).data.val_shots == k, (preset, k)


def test_imagenet_templates_per_method(presets):
    """*_16shot and sweep=shots: Tip-Adapter's 7 on ImageNet for GDA/LP++/ProLIP, TaskRes those + 'a photo of a {}.'."""
    for sweep in ((), ("sweep=shots",)):
        for preset in ("gda_16shot", "lpp_16shot", "prolip_16shot", "gda_b2n", "prolip_b2n"):
            cfg = presets.case(preset, "imagenet", 4, *sweep)
            assert cfg.data.templates == "tip7", preset
            assert presets.case(preset, "dtd", 4, *sweep).data.templates is None
        tr = presets.case("taskres_16shot", "imagenet", 4, *sweep).data.templates
        assert list(tr) == TIP7 + ["a photo of a {}."]
    from xmx.data.templates import (
        resolve_templates,  # the name tip7 is Tip-Adapter's list
    )
    assert resolve_templates("tip7", []) == TIP7


def test_gda_keeps_alpha_0_1_when_nothing_helps():
    from xmx.methods.gda import search_alpha
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    a, acc, curve = search_alpha(zs, g, torch.tensor([1, 1]), alphas=(1e-4, 1e-3, 1.0))
    assert a == 0.1 and acc == 0.0 and [c for _, c in curve] == [0.0, 0.0, 0.0]

    def release(zs, g, y, alphas):  # main_few_shots.py:68-76, restated
        best_acc, best_alpha = 0, 0.1
        for alpha in alphas:
            acc = 100.0 * float(((zs + alpha * g).argmax(1) == y).float().mean())
            if acc > best_acc:
                best_acc, best_alpha = acc, alpha
        return best_alpha
    torch.manual_seed(0)
    for _ in range(20):
        zs, g, y = torch.randn(30, 5), torch.randn(30, 5), torch.randint(5, (30,))
        alphas = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
        assert search_alpha(zs, g, y, alphas)[0] == release(zs, g, y, alphas)


def test_taskres_keeps_underscores(tiny_clip, presets):
    names, tmpl = ["yin_yang", "water_lilly"], ["a photo of a {}."]
    raw = tiny_clip.encode_text(tiny_clip.tokenize(["a photo of a yin_yang.", "a photo of a water_lilly."])).float()
    kept = tiny_clip.text_classifier(names, tmpl, normalize=False, underscores=True)
    torch.testing.assert_close(kept, raw.T, rtol=1e-5, atol=1e-5)
    spaced = tiny_clip.text_classifier(names, tmpl, normalize=False)
    assert not torch.allclose(spaced, kept, atol=1e-4)
    assert presets.case("taskres_16shot", "caltech101", 16).method.classnames == "keep_underscores"
    from xmx.methods.taskres import TaskResMethod
    with pytest.raises(XmxError, match="method.classnames"):
        TaskResMethod(classnames="dashes")


def test_prolip_fp16_trains_in_half():
    """One full-batch Adam step in half precision, restated: P1 = P0 - lr·m̂/(sqrt(v̂)+eps) computed in fp16."""
    from xmx.methods.prolip import fit_projection, prolip_loss
    torch.manual_seed(0)
    z, y = torch.randn(12, 8), torch.randint(3, (12,))
    P0, W = torch.randn(8, 4) * 0.1, torch.nn.functional.normalize(torch.randn(4, 3), dim=0)
    P16, _ = fit_projection(z[None], y, P0, None, W, lr=1e-3, lam=0.5, epochs=1, dtype=torch.float16)
    P32, _ = fit_projection(z[None], y, P0, None, W, lr=1e-3, lam=0.5, epochs=1)
    Ph = P0.half().clone().requires_grad_(True)
    prolip_loss(z.half(), y, Ph, P0.half(), None, W.half(), 0.5).float().backward()
    g = Ph.grad
    m_hat, v_hat = g, g * g  # first step: bias-corrected moments are g and g²
    expect = (P0.half() - 1e-3 * (m_hat / (v_hat.sqrt() + 1e-4))).float()
    torch.testing.assert_close(P16, expect, rtol=0, atol=2e-3)
    assert P16.dtype == torch.float32 and not torch.equal(P16, P32)
    from xmx.methods.prolip import ProLIPMethod
    with pytest.raises(XmxError, match="method.precision"):
        ProLIPMethod(precision="bf16")


@pytest.mark.parametrize("preset", ["coop_16shot", "coop_b2n", "kgcoop_b2n", "taskres_16shot", "cocoop_b2n",
                                    "clip_adapter_paper_16shot"])
def test_fresh_crop_every_epoch(presets, preset):
    from xmx.datamodules.clip import EpochBatchSampler
    for ds in ("dtd", "imagenet"):
        cfg = presets.case(preset, ds, 16)
        assert cfg.augment.views == cfg.method.epochs and cfg.data.view_sampling == "cycle", (preset, ds)
    s = EpochBatchSampler(10, views=6, batch_size=4, seed=0, view_sampling="cycle")
    seen = []
    for e in range(6):
        s.set_epoch(e)
        seen.append({int(v) for b in s for v in b[:, 1]})
    assert seen == [{e} for e in range(6)]  # epoch e: view e for every image; no view repeats within the run


@pytest.mark.parametrize("n,bs", [(70, 32), (64, 32), (20, 32), (1, 1), (47, 32)])
def test_drop_last_is_dassls(n, bs):
    """Dassl: drop_last = is_train and len(data) >= batch_size (data_manager.py:43): torch's DataLoader as the oracle."""
    from torch.utils.data import DataLoader

    from xmx.datamodules.clip import EpochBatchSampler
    want = [len(b) for b in DataLoader(range(n), batch_size=bs, drop_last=n >= bs)]
    s = EpochBatchSampler(n, views=1, batch_size=bs, seed=0, drop_last=True)
    got = [len(b) for b in s]
    assert got == want and len(s) == len(want)
    assert [len(b) for b in EpochBatchSampler(n, 1, bs, 0)] == [len(b) for b in DataLoader(range(n), batch_size=bs)]


def _dassl_lrs(base: float, epochs: int, warmup: int = 1, cons: float = 1e-5) -> list[float]:
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs)) with WARMUP_RECOUNT, stepped once per epoch
    (dassl/optim/lr_scheduler.py:27-33): while last_epoch < warmup the warm-up's own lr, then the successor steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    succ = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for last in range(epochs):  # the warm-up scheduler's last_epoch
        lrs.append(cons if last < warmup else succ.get_last_lr()[0])
        if last >= warmup:
            succ.step()
    return lrs


def _run_lrs(opt, sched, epochs):
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_one_dassl_scheduler_for_coop_taskres_clip_adapter(presets):
    from hydra.utils import instantiate

    from xmx.methods.base import WarmupCosineLR
    from xmx.methods.clip_adapter import ConstantWarmupCosine
    from xmx.methods.taskres import TaskResHead, TaskResMethod, warmup_cosine
    E = 12
    for preset in ("coop_16shot", "clip_adapter_paper_16shot", "kgcoop_b2n"):
        node = presets.base(preset).method.scheduler
        assert node._target_ == "xmx.methods.base.WarmupCosineLR", preset
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
        lrs = _run_lrs(opt, instantiate(node)(opt, T_max=E), E)
        assert lrs == pytest.approx(_dassl_lrs(0.002, E), rel=1e-9), preset
    assert ConstantWarmupCosine is WarmupCosineLR
    m = TaskResMethod(optimizer=lambda params: torch.optim.Adam(params, lr=2e-3))
    m.head = TaskResHead(torch.randn(4, 3), 0.5)
    m._trainer = SimpleNamespace(max_epochs=E)
    conf = m.configure_optimizers()
    lrs = _run_lrs(conf["optimizer"], conf["lr_scheduler"]["scheduler"], E)
    assert lrs == pytest.approx(_dassl_lrs(2e-3, E), rel=1e-9)
    assert [warmup_cosine(e, E, 2e-3) * 2e-3 for e in range(E)] == pytest.approx(_dassl_lrs(2e-3, E), rel=1e-9)
    assert math.isclose(lrs[1], 2e-3)  # the first epoch after the warm-up runs at the full lr (Dassl's recount)


def test_k_shot_validation_keeps_small_classes_whole():
    """Dassl's generate_fewshot_dataset(repeat=False), which LP++'s and ProLIP's K-shot validation subsets use: a class
    with fewer than K images keeps all of them; classes with K or more are sampled as before (same draws)."""
    from xmx.data.datasets import Datum
    from xmx.data.fewshot import sample_fewshot
    items = [Datum(f"a{i}.jpg", 0, "a") for i in range(20)] + [Datum(f"b{i}.jpg", 1, "b") for i in range(5)]
    got = sample_fewshot(items, 16, 1, "val", short="all")
    assert sum(d.label == 0 for d in got) == 16 and [d.path for d in got if d.label == 1] == [f"b{i}.jpg" for i in range(5)]
    alone = sample_fewshot(items[:20], 16, 1, "val")
    assert [d.path for d in got if d.label == 0] == [d.path for d in alone]
    with pytest.raises(XmxError, match="has only 5 val images"):
        sample_fewshot(items, 16, 1, "val")
