"""Declared domains (xmx/validate.py): every boolean, choice and numeric range of every ``_target_`` class a config
names, and of the keys without a ``_target_``, refuses a value outside it in one line naming the key - and nothing
any shipped preset sets is refused."""

from __future__ import annotations

import typing

import pytest
import yaml

from xmx.config import config_dir
from xmx.errors import XmxError
from xmx.validate import CONFIG_KEYS, check_value, check_values, domain, member_kind, target_domains, union_members

CONF = config_dir()
TARGETS = sorted({str(v) for f in CONF.rglob("*.yaml") for v in
                  [(yaml.safe_load(f.read_text()) or {}).get("_target_")] if isinstance(v, str) and v.startswith("xmx.")})
# (library targets are checked too - test_library_classes_are_read_too - but their parameters are not enumerated here)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


def _outside(ann) -> list:
    """Values outside a checkable annotation: a word for every domain, and a number just past every bound."""
    out = ["sometimes"] if not any(k == "literal" and "sometimes" in p for k, p in domain(ann)) else []
    kinds = domain(ann)
    accepts_none = any(k == "none" for k, _ in kinds)
    for kind, p in kinds:
        if kind in ("int", "float"):
            for m in p:
                for name, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                    b = getattr(m, name, None)
                    if b is not None:
                        out.append(b + step if kind == "int" or step else b)
            if kind == "int":
                out.append(2.5)
        if kind == "bool" and not accepts_none:
            out.append(None)
    return out


def _declared():
    for target in TARGETS:
        for key, ann in target_domains(target).items():
            if domain(ann) is not None:
                yield target, key, ann


DECLARED = list(_declared())


def test_the_classes_declare_domains_for_their_booleans_and_choices():
    names = {(t.rsplit(".", 1)[-1], k) for t, k, _ in DECLARED}
    for must in [("CLIPBackbone", "quick_gelu"), ("CoCoOpMethod", "meta_reduction"), ("TipAdapterMethod", "beta_max"),
                 ("TipAdapterMethod", "n_beta"), ("TipAdapterMethod", "search"), ("GDAMethod", "new_topk"),
                 ("CLIPDataModule", "view_sampling"), ("LPPMethod", "precision"), ("MMAMethod", "adapt_text"),
                 ("CoOpMethod", "csc"), ("ClipLoRAMethod", "encoder")]:
        assert must in names, must
    assert {"train", "test", "augment.views", "augment.noise_std", "features.precision"} <= set(CONFIG_KEYS)
    # no boolean parameter of an xmx class is left undeclared: a plain `bool` annotation is a declared domain
    for target in TARGETS:
        for key, ann in target_domains(target).items():
            if any(member_kind(m) and member_kind(m)[0] == "bool" for m in union_members(ann)):
                assert domain(ann) is not None, (target, key)


@pytest.mark.parametrize("target,key,ann", DECLARED, ids=[f"{t.rsplit('.', 1)[-1]}.{k}" for t, k, _ in DECLARED])
def test_every_declared_key_refuses_a_value_outside_its_domain(target, key, ann):
    for bad in _outside(ann):
        with pytest.raises(XmxError) as e:
            check_value(f"method.{key}", bad, ann)
        msg = str(e.value)
        assert msg.startswith(f"method.{key}=") and "\n" not in msg and ("valid choices" in msg or "must be" in msg)


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_every_key_without_a_target_refuses_a_value_outside_its_domain(key):
    for bad in _outside(CONFIG_KEYS[key]):
        with pytest.raises(XmxError, match=rf"^{key}="):
            check_value(key, bad, CONFIG_KEYS[key])


def test_values_inside_the_domain_pass_and_nothing_is_converted():
    from typing import Literal

    from xmx.validate import Fraction, PosInt
    check_value("k", True, bool)
    check_value("k", 3, PosInt)
    check_value("k", 1, Fraction)  # an int where a float is declared
    check_value("k", "auto", bool | Literal["auto"])
    for bad, ann in [("no", bool), (1, bool), (True, PosInt), (float("nan"), Fraction), ("1", PosInt)]:
        with pytest.raises(XmxError):
            check_value("k", bad, ann)


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_no_shipped_preset_is_refused():
    for exp in EXPERIMENTS:
        check_values(_compose([f"experiment={exp}", "paths.cache_dir=/nonexistent"]))


def test_library_classes_are_read_too():
    """Lightning's Trainer and torch's optimisers declare their booleans and choices the same way."""
    doms = target_domains("lightning.pytorch.Trainer")
    assert domain(doms["deterministic"]) is not None and domain(doms["max_epochs"]) is not None
    with pytest.raises(XmxError, match=r"^method\.optimizer\.nesterov='yes': must be true or false"):
        check_values(_compose(["method=coop", "method.optimizer.nesterov=yes"]))


def test_the_method_key_is_named_when_the_data_reads_it():
    cfg = _compose(["method=coop", "method.view_sampling=sometimes"])
    with pytest.raises(XmxError, match=r"^method\.view_sampling='sometimes'; valid choices: random, cycle$"):
        check_values(cfg)


def test_literal_choices_are_the_modules_own_constants():
    """The annotations read the tuples the code checks against (one source): e.g. CLIP-LoRA's positions."""
    from xmx.backbones.lora import POSITIONS
    from xmx.methods._training import AMP
    assert typing.get_args(target_domains("xmx.methods.clip_lora.ClipLoRAMethod")["position"]) == POSITIONS
    assert typing.get_args(target_domains("xmx.methods.clip_lora.ClipLoRAMethod")["amp"]) == AMP
    from xmx.data.protocols import BASE_SPLITS
    assert typing.get_args(CONFIG_KEYS["protocol.base_split"]) == tuple(BASE_SPLITS)
    from xmx.data.transforms import PRESETS
    assert set(typing.get_args(CONFIG_KEYS["augment.preset"])) == set(PRESETS)
