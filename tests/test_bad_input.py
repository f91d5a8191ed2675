"""Every bad input the first hour meets is one ``error:`` line on stderr (printed once), exit code 2, no traceback,
nothing left that a later run takes as valid - and, where the config alone shows it, before anything is built.

The cases run through the real command line in-process (``xmx.run.main()`` / ``xmx.features.__main__.main()``), and
this test writes the table of ``docs/errors.md`` from what they print: the test fails when the file differs from
what the code prints now; ``XMX_WRITE_DOCS=1 pytest tests/test_bad_input.py`` rewrites it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import xmx.jobs as xjobs
import xmx.run as xrun
from tiny_trainable import OVERRIDES as TINY
from xmx.features import __main__ as features_cli

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
QUIET = ["logger=none", "callbacks.rich_progress_bar=null"]

DEEP = ["backbone=tiny", "data=synthetic", "callbacks=final"]  # deep prompts / MMRL on the tiny CLIP
# (case, command-line arguments with {placeholders}, a phrase the line must contain, answered before any build)
RUN_CASES = [
    ("unknown experiment", ["experiment=no_such"], "unknown experiment 'no_such'", True),
    ("unknown option of a group", ["method=tip_adaptor"], "unknown method 'tip_adaptor'", True),
    ("misspelt key", ["method.batch_sise=8"], "method.batch_sise: no such key in method", True),
    ("new key added with +", ["+method.typo=1"], "method.typo: not a setting of", True),
    ("misspelt optimiser key", ["method=clip_adapter", "+method.optimizer.lrr=0.1"],
     "method.optimizer.lrr: not a setting of torch.optim.Adam;", True),
    ("shots = 0", ["shots=0"], "shots=0: must be at least 1", True),
    ("shots < 0", ["shots=-4"], "shots=-4: must be at least 1", True),
    ("seed not an integer", ["seed=abc"], "seed='abc': must be a whole number", True),
    ("seed with a fraction", ["seed=1.5"], "seed=1.5: must be a whole number", True),
    ("negative learning rate", ["method=clip_adapter", "method.optimizer.lr=-0.01"],
     "method.optimizer.lr=-0.01: a learning rate must be positive", True),
    ("epochs = 0", ["method=clip_adapter", "method.epochs=0"], "method.epochs=0: must be at least 1", True),
    ("batch_size = 0", ["method=clip_adapter", "method.batch_size=0"], "method.batch_size=0: must be at least 1",
     True),
    ("negative DataLoader workers", ["data.num_workers=-1"], "data.num_workers=-1: must be at least 0", True),
    ("unknown image decode", ["data.decode=nvjpeg"], "data.decode='nvjpeg'; valid choices: pil, auto, gpu, tensor",
     True),
    ("unknown text data source", ["experiment=xadapter_glue", "data.source=web"],
     "data.source='web'; valid choices: files, hf", True),
    ("threads not a number", ["threads=many"], "threads='many': must be auto or a whole number", True),
    ("trainer=gpu without a GPU", ["trainer=gpu"], "trainer.accelerator=gpu but this machine has no CUDA GPU",
     True),
    ("features on the GPU without one", ["features.device=cuda"], "features.device=cuda but this machine has no",
     True),
    ("cache folder is a file", ["paths.cache_dir={file}"], "is a file, not a folder; point paths.cache_dir", True),
    ("cache folder not writable", ["paths.cache_dir={readonly}/cache"], "cannot write there", True),
    ("feature store not writable", ["features.root={readonly}/features"],
     "features.root={readonly}/features: cannot write there", True),
    ("log folder is a file", ["paths.log_dir={file}"], "cannot create the run folder", True),
    ("W&B without API key, online", ["logger=wandb"], "log offline with WANDB_MODE=offline", True),
    ("init_from: not a checkpoint", ["method=linear_probe", "train=false", "init_from={garbage}"],
     "is not a readable PyTorch checkpoint", True),
    ("init_from: a plain state_dict", ["method=linear_probe", "train=false", "init_from={plain}"],
     "holds no 'state_dict'", True),
    ("init_from: another method family", ["TINY", "train=false", "init_from={other_family}"],
     "the checkpoint is of method mma (mma family)", True),
    ("init_from: tensors of other shapes", ["TINY", "train=false", "init_from={other_shapes}"],
     "2 tensors have other shapes than in this run (e.g. head.weight: (3, 32) in the checkpoint, (10, 32) here)",
     False),
    ("init_from: nothing would load", ["TINY", "train=false", "init_from={nothing}"],
     "none of the checkpoint's 1 tensors (e.g. prompt.ctx) is a parameter of tiny_trainable", False),
    ("corrupt backbone weights", ["backbone.weights={garbage}"], "is not a readable xmx-tiny checkpoint", False),
    ("unknown dataset", ["data.name=no_such_set"], "unknown dataset 'no_such_set'; valid choices:", True),
    ("$DATA folder missing", ["data=dtd", "paths.data_dir={tmp}/no_data"], "data root {tmp}/no_data does not exist",
     True),
    ("resume: bad choice", ["resume=sometimes"], "resume='sometimes'; valid choices: auto, never", True),
    # declared domains (xmx/validate.py): every boolean, choice and numeric range, named by its key, before work
    ("boolean as a word: train", ["train=no"], "train='no': must be true or false", True),
    ("boolean as a word: test", ["test=no"], "test='no': must be true or false", True),
    ("boolean of the backbone", ["backbone.quick_gelu=sometimes"],
     "backbone.quick_gelu='sometimes': must be true or false, auto", True),
    ("boolean of a method", ["method=tip_adapter", "method.search=maybe"], "method.search='maybe': must be true or",
     True),
    ("boolean of the optimiser (a library class)", ["method=coop", "method.optimizer.nesterov=yes"],
     "method.optimizer.nesterov='yes': must be true or false", True),
    ("choice of the trainer (a library class)", ["trainer.precision=8"], "trainer.precision=8; valid choices:", True),
    ("choice of a method that the data reads", ["method=coop", "method.view_sampling=sometimes"],
     "method.view_sampling='sometimes'; valid choices: random, cycle", True),
    ("choice of the feature store", ["features.precision=int8"], "features.precision='int8'; valid choices: fp16",
     True),
    ("choice of the protocol", ["protocol=base2new", "protocol.base_split=round"],
     "protocol.base_split='round'; valid choices:", True),
    ("negative search maximum", ["method=tip_adapter", "method.beta_max=-1"],
     "method.beta_max=-1: must be a number > 0, null", True),
    ("grid of no points", ["method=tip_adapter", "method.n_beta=0"], "method.n_beta=0: must be a whole number >= 1",
     True),
    ("zero Meta-Net reduction", ["method=cocoop", "method.meta_reduction=0"],
     "method.meta_reduction=0: must be a whole number >= 1", True),
    ("weight outside [0, 1]", ["method=mma", "method.lam=1.5"], "method.lam=1.5: must be a number >= 0 and <= 1",
     True),
    ("whole number given a fraction", ["method=gda", "method.new_topk=2.5"],
     "method.new_topk=2.5: must be a whole number >= 2", True),
    ("zero augmented views", ["augment.views=0"], "augment.views=0: must be a whole number >= 1", True),
    ("negative noise", ["augment.noise_std=-1"], "augment.noise_std=-1: must be a number >= 0", True),
    ("a method's own check (its constructor)", ["method=clip_lora", "method.params=[q,x]"],
     "method.params=['q', 'x']: entries must be distinct items of q, k, v, o", True),
    ("required key left unset", ["backbone=hf_clip"], "backbone.name_or_path is required and has no value", True),
    ("GDA topk above the training features", ["method=gda", "protocol=base2new", "method.new_topk=100000"],
     "method.new_topk=100000 is more than the", False),
    # subset files, checked against the dataset when it is listed
    ("subset file: a JSON list", ["data.subset_file={subset_list}"], "the file holds a JSON list, not an object",
     False),
    ("subset file: empty training list", ["data.subset_file={subset_empty}"], 'the "train" list is empty', False),
    ("subset file: an image twice", ["data.subset_file={subset_dup}"], 'is listed twice in "train"', False),
    ("subset file: a float label", ["data.subset_file={subset_float}"],
     "the label must be a whole number (a class index), not 0.0", False),
    ("subset file: a label out of range", ["data.subset_file={subset_range}"], "is out of range: the dataset has",
     False),
    ("subset file: a path outside $DATA", ["data.subset_file={subset_outside}"], "the path leaves the dataset folder",
     False),
    ("subset file: a class missing", ["data.subset_file={subset_missing}", "shots=1"],
     "1 of the 10 classes this protocol trains on have no training image", False),
    ("subset file: 5 images of one class for shots=16", ["data.subset_file={subset_five}", "shots=16"],
     "has 5 training images but shots=16", False),
    # checkpoints and weights of another model
    ("init_from: another backbone", ["TINY", "train=false", "init_from={other_backbone}"],
     "the checkpoint was trained on backbone ViT-B-16 with weights openai, this run uses xmx-tiny", True),
    ("backbone weights of another architecture", ["backbone.weights={siglip_bin}"],
     "holds the weights of another architecture", False),
    ("$DATA is a file", ["data=dtd", "paths.data_dir={file}"], "data root {file} is a file, not a folder", True),
    ("deep prompts: zero tokens", [*DEEP, "method=ivlp", "method.n_ctx_text=0"],
     "method.n_ctx_text=0: at least one prompt token", False),
    ("deep prompts: depth beyond the tower", [*DEEP, "method=maple"],
     "method.depth_text=9 goes beyond the 2 layers of the text tower", False),
    ("MaPLe coupling with unequal depths", [*DEEP, "method=maple", "method.depth_vision=1"],
     "method.coupling=true: method.depth_vision=1 must equal", False),
    ("deep prompts on a tower without a ViT", [*DEEP, "backbone.model=xmx-tiny-rn", "method=maple",
                                                "method.depth_text=1", "method.depth_vision=1"],
     "is not open_clip's VisionTransformer", False),
    ("MMRL layers beyond the tower", [*DEEP, "method=mmrl"],
     "method.rep_layers=[6, 7, 8, 9, 10, 11, 12] go beyond the 2 layers", False),
    ("CLIP-SVD: unknown projection", ["backbone=tiny", "method=clip_svd", "method.params=[q,x]"],
     "method.params=['q', 'x']: entries must be distinct items of q, k, v, o, mlp", False),
    ("CLIP-SVD: unknown layers", ["backbone=tiny", "method=clip_svd", "method.layers=upper"],
     "method.layers='upper' is unknown", False),
    ("2SFS: stage split outside (0, 1)", ["backbone=tiny", "method=twosfs", "method.stage1_fraction=1.0"],
     "method.stage1_fraction=1.0: the share of the steps given to stage 1 must be in (0, 1)", False),
    ("2SFS: unknown stage-1 tuning", ["backbone=tiny", "method=twosfs", "method.peft=lora"],
     "method.peft='lora': only ln", False),
    ("resume schedule not positive", ["callbacks.resume.every_minutes=0"],
     "callbacks.resume.every_minutes=0: must be a positive number of minutes", True),
    ("TDA outside protocol=test_time", ["method=tda"], "method=tda runs on protocol=test_time", False),
    ("TDA views that keep no confident view", ["method=tda", "protocol=test_time", "method.views=5"],
     "method.views=5 keeps int(5 x 0.1) = 0 confident views", False),
    ("TPT outside protocol=test_time", ["method=tpt"], "method=tpt runs on protocol=test_time", False),
    ("TDA on a base not built yet", ["method=tda", "protocol=test_time", "init_from={clip_lora}"],
     "TDA on top of clip_lora (xmx.methods.clip_lora.ClipLoRAMethod) is not built yet (its adapted image encoder", True),
    ("TDA on a base it cannot compose on", ["method=tda", "protocol=test_time", "init_from={cocoop}"],
     "TDA on top of cocoop (xmx.methods.coop.CoCoOpMethod) is not meaningful", True),
    ("TPT with no step", ["method=tpt", "protocol=test_time", "method.steps=0"], "method.steps=0", False),
]
FEATURE_CASES = [
    ("xmx.features: unknown command", ["lst"], "'lst' is neither a command (list, verify, prune)"),
    ("xmx.features: unknown option", ["list", "--bogus"], "unrecognized arguments: --bogus"),
    ("xmx.features: unknown experiment", ["experiment=no_such"], "unknown experiment 'no_such'"),
    ("xmx.features: shots = 0", ["shots=0"], "shots=0: must be at least 1"),
    ("xmx.features: prune --before a word", ["prune", "--before", "yesterday"], "--before yesterday: not an ISO date"),
]
# other command lines: (case, module, arguments, phrase)
TOOL_CASES = [
    ("xmx.data fake onto a file", "xmx.data", ["fake", "{file}"], "{file} is a file, not a folder"),
    ("xmx.report --out a file", "xmx.report", ["{tmp}", "--out", "{file}", "--no-plots"],
     "--out={file}: {file} is a file, not a folder"),
]


def _subset_files(tmp_path: Path, xmx_cache: Path) -> dict:
    """One file per class of bad subset file, against the synthetic dataset the cases run on (10 classes)."""
    import json

    from xmx.data.datasets import load_dataset
    train = load_dataset("synthetic", xmx_cache / "data").train
    one = {}
    for d in train:
        one.setdefault(d.label, d)
    rows = [[d.path, d.label, d.classname] for _, d in sorted(one.items())]
    five = [[d.path, d.label, d.classname] for d in train if d.label == 0][:5]
    files = {"subset_list": rows, "subset_empty": {"train": []}, "subset_dup": {"train": rows + rows[:1]},
             "subset_float": {"train": [[rows[0][0], 0.0, rows[0][2]]] + rows[1:]},
             "subset_range": {"train": rows + [["synthetic/images/x.jpg", 10, "x"]]},
             "subset_outside": {"train": [["../etc/passwd", 0, rows[0][2]]] + rows[1:]},
             "subset_missing": {"train": rows[1:]}, "subset_five": {"train": five + rows[1:]}}
    out = {}
    for name, raw in files.items():
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(raw))
    return out


@pytest.fixture
def places(tmp_path, monkeypatch, xmx_cache):
    """The files and folders the cases point at; W&B with no key and no offline mode."""
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.ckpt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 40)
    (tmp_path / "a_file").write_text("x")
    torch.save({"state_dict": {"head.weight": torch.zeros(3, 32)}, "xmx_method": {"name": "mma", "family": "mma"}},
               tmp_path / "other_family.ckpt")
    torch.save({"state_dict": {"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)}},
               tmp_path / "other_shapes.ckpt")
    torch.save({"state_dict": {"prompt.ctx": torch.zeros(4, 8)}}, tmp_path / "nothing.ckpt")
    torch.save({"state_dict": {"head.weight": torch.zeros(10, 32)},
                "xmx_backbone": {"loader": "CLIPBackbone", "arch": "ViT-B-16", "weights": "openai"}},
               tmp_path / "other_backbone.ckpt")
    from hf_tiny import save_tiny
    siglip = save_tiny(tmp_path / "siglip", kind="siglip")
    from safetensors.torch import load_file
    torch.save(load_file(siglip / "model.safetensors"), tmp_path / "pytorch_model.bin")  # a transformers .bin
    for name, cls in (("clip_lora", "xmx.methods.clip_lora.ClipLoRAMethod"), ("cocoop", "xmx.methods.coop.CoCoOpMethod")):
        torch.save({"state_dict": {"x": torch.zeros(1)}, "xmx_method": {"name": name, "family": cls.split(".")[2],
                                                                        "class": cls}}, tmp_path / f"{name}.ckpt")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: use a folder the kernel refuses to everyone
        readonly = Path("/sys/xmx-test")
    else:
        os.chmod(tmp_path / "readonly", 0o500)
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    yield {"tmp": tmp_path, "file": tmp_path / "a_file", "readonly": readonly, "garbage": tmp_path / "garbage.pt",
           "plain": tmp_path / "plain.ckpt", "other_family": tmp_path / "other_family.ckpt",
           "other_shapes": tmp_path / "other_shapes.ckpt", "nothing": tmp_path / "nothing.ckpt",
           "other_backbone": tmp_path / "other_backbone.ckpt", "siglip_bin": tmp_path / "pytorch_model.bin",
           "clip_lora": tmp_path / "clip_lora.ckpt", "cocoop": tmp_path / "cocoop.ckpt",
           **_subset_files(tmp_path, xmx_cache)}
    os.chmod(tmp_path / "readonly", 0o700)


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = ["xmx", *argv]
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    return int(code or 0), capsys.readouterr().err


def _shown(text: str, places: dict, tmp_path: Path) -> str:
    """The line as the table shows it: this run's paths as placeholders, lists of choices as ``<list>``."""
    for name, p in sorted(places.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(p), "{" + name + "}")
    text = text.replace(str(tmp_path), "{tmp}")
    text = re.sub(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", "<time>", text)
    # lists of options change whenever a preset or dataset is added: the table shows that a list is given
    text = re.sub(r"(valid choices|its settings|its keys): ([^;()]*?)( \(|;|$)", r"\1: <list>\3", text)
    return text.replace("|", "\\|")


def _table(rows) -> str:
    head = ("# Bad input and what xmx says\n\n"
            "Every row is a case of `tests/test_bad_input.py`, which runs it through the command line and writes this "
            "table (`XMX_WRITE_DOCS=1 pytest tests/test_bad_input.py`; the test fails when the file is out of date). "
            "Each prints one `error:` line on stderr and exits with code 2, without a traceback and without leaving a "
            "result a later run would take as valid. \"before any build\": answered from the config alone (no model, "
            "data or features touched). `{file}`, `{readonly}`, `{garbage}` ... stand for the paths the test uses.\n\n"
            "| case | command | error line | before any build |\n|---|---|---|---|\n")
    return head + "".join(f"| {c} | `{cmd}` | `` {line} `` | {early} |\n" for c, cmd, line, early in rows)


def test_every_bad_input_is_one_line_exit_2_and_the_table_is_current(places, make_cfg, xmx_cache, tmp_path,
                                                                     capsys, monkeypatch):
    rows, failures = [], []
    gpu = torch.cuda.is_available()
    real_build = xrun.build
    for case, args, needle, early in RUN_CASES:
        if gpu and "GPU" in case:
            continue
        log_dir = tmp_path / "logs" / re.sub(r"\W+", "_", case)
        argv = [b for a in args for b in (TINY if a == "TINY" else [a.format(**places)])]
        keys = {a.split("=")[0] for a in argv}
        argv = [f"{k}={v}" for k, v in (("paths.cache_dir", xmx_cache), ("paths.log_dir", log_dir))
                if k not in keys] + argv + [q for q in QUIET if q.split("=")[0] not in keys]

        def no_build(*a, _case=case, **k):
            raise AssertionError(f"{_case}: an object was built before the error")
        monkeypatch.setattr(xrun, "build", no_build if early else real_build)
        monkeypatch.setattr(xjobs, "build", no_build if early else real_build)  # the early datamodule
        code, err = _cli(xrun.main, argv, capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("error:")]
        ok = (code == 2 and len(errors) == 1 and needle.format(**places) in errors[0] and "Traceback" not in err
              and len(lines) == 1)
        left = list(log_dir.rglob("results.json")) + [p for p in log_dir.rglob(".index/*.json")
                                                      if '"complete"' in p.read_text()]
        if not ok or left:
            failures.append(f"{case}: exit {code}, stderr {err[-600:]!r}, left {left}")
            continue
        shown = " ".join("method=<a trainable method>" if a == "TINY" else a for a in args)
        rows.append((case, f"python -m xmx.run {shown}", _shown(errors[0], places, tmp_path),
                     "yes" if early else "no: when the model is set up"))
    monkeypatch.setattr(xrun, "build", real_build)
    monkeypatch.setattr(xjobs, "build", real_build)
    for case, args, needle in FEATURE_CASES:
        extra = [f"paths.cache_dir={xmx_cache}"] if "=" in args[-1] else []
        code = features_cli.main(args + extra)
        err = capsys.readouterr().err
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        if not (code == 2 and len(errors) == 1 and needle in errors[0] and len(err.splitlines()) == 1):
            failures.append(f"{case}: exit {code}, stderr {err[-600:]!r}")
            continue
        rows.append((case, f"python -m xmx.features {' '.join(args)}", _shown(errors[0], places, tmp_path), "yes"))
    import importlib
    for case, module, args, needle in TOOL_CASES:
        argv = [a.format(**places) for a in args]
        main = importlib.import_module(f"{module}.__main__" if module == "xmx.data" else "xmx.report.cli").main
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        errors = [l for l in err.splitlines() if "error:" in l]
        if not (code == 2 and len(errors) == 1 and needle.format(**places) in errors[0] and "Traceback" not in err):
            failures.append(f"{case}: exit {code}, stderr {err[-600:]!r}")
            continue
        rows.append((case, f"python -m {module} {' '.join(args)}", _shown(errors[0], places, tmp_path), "yes"))
    assert not failures, "\n".join(failures)
    if gpu:
        pytest.skip("a GPU is present: the GPU rows cannot be produced here, so docs/errors.md is not compared")
    text = _table(rows)
    if os.environ.get("XMX_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/errors.md is out of date: rerun with XMX_WRITE_DOCS=1 pytest tests/test_bad_input.py")


def test_features_help_answers_without_torch(capsys):
    assert features_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m xmx.features list" in out and "python -m xmx.features verify" in out
