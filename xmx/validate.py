"""The declared domain of every config value, checked before any work.

One source: a ``_target_`` class declares each setting's domain in its ``__init__`` annotations - ``bool``,
``Literal["a", "b"]``, ``int``/``float`` with ``annotated_types`` bounds (``PosInt``, ``Annotated[float, Ge(0)]``,
...) - and :data:`CONFIG_KEYS` declares the keys of nodes without a ``_target_`` (top level, ``features``,
``augment``, ``protocol``). :func:`check_values` walks a composed config and refuses a value outside its domain in one
:class:`~xmx.errors.XmxError` line that names the key and its allowed values (``train=no``, ``method.beta_max=-1``,
``method.view_sampling=sometimes``), before the data is read or a model built. Nothing is clamped: the value that
passes is the value used and recorded. Annotations that are not domains (``str``, ``dict``, tensors, partials) are
not checked here.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from typing import Annotated, Literal, Union

import annotated_types as at

from xmx.errors import XmxError

Ge, Gt, Le, Lt, Interval = at.Ge, at.Gt, at.Le, at.Lt, at.Interval

PosInt = Annotated[int, Ge(1)]            # counts that must be at least one (epochs, shots, views, widths, grids)
NonNegInt = Annotated[int, Ge(0)]         # seeds, workers, indices
PosFloat = Annotated[float, Gt(0)]        # scales, temperatures, learning rates
NonNegFloat = Annotated[float, Ge(0)]     # weights, noise, ratios that may be zero
Fraction = Annotated[float, Interval(ge=0, le=1)]  # probabilities, mixing weights in [0, 1]
OpenFraction = Annotated[float, Interval(gt=0, lt=1)]

# enumerations shared by code below the methods (the modules that use them take their tuples from here)
AugmentPreset = Literal["none", "coop", "tip", "tpt_crop", "augmix"]  # = xmx.data.transforms.PRESETS (a test holds it)
ProtocolName = Literal["fewshot", "base2new", "cross_dataset", "domain_shift", "test_time"]
BaseSplit = Literal["ceil", "floor", "release"]
Precision = Literal["fp32", "fp16", "bf16"]
Decode = Literal["pil", "auto", "gpu", "tensor"]

# keys of nodes without a ``_target_`` (a ``_target_`` node's keys are declared by its class's ``__init__``)
CONFIG_KEYS: dict[str, object] = {
    "train": bool, "test": bool, "skip_done": bool,
    "resume": Union[Literal["auto", "never", False], None],  # false and null: never
    "selection": Literal["val", "paper"],
    "shots": PosInt, "seed": NonNegInt,
    "features.enabled": bool, "features.precision": Literal["fp16", "fp32"], "features.batch_size": PosInt,
    "features.num_workers": NonNegInt, "features.decode": Decode, "features.amp": Precision,
    "augment.preset": AugmentPreset, "augment.views": PosInt, "augment.noise_std": NonNegFloat,
    "augment.noise_on_eval": bool,
    "protocol.name": ProtocolName, "protocol.base_split": BaseSplit, "protocol.base_ratio": OpenFraction,
}


# what a required key (``???`` in its config) is, for the line that asks for it
MISSING_HINTS = {
    "backbone.name_or_path": "a Hugging Face save_pretrained folder of a CLIPModel or SiglipModel, or a hub name in "
                             "the local cache, e.g. backbone.name_or_path=/models/siglip-base-patch16-224",
    "data.name": "a dataset name, e.g. data=dtd",
}


def missing_line(e: BaseException) -> str | None:
    """The line for OmegaConf's ``MissingMandatoryValue`` (a ``???`` key left unset), or None for another error."""
    from omegaconf.errors import MissingMandatoryValue
    if not isinstance(e, MissingMandatoryValue):
        return None
    key = str(getattr(e, "full_key", "") or "").strip() or "a required key"
    return (f"{key} is required and has no value (???); set {key}=<value>"
            + (f" ({MISSING_HINTS[key]})" if key in MISSING_HINTS else ""))


def choices(lit) -> tuple:
    """The values of a ``Literal[...]``."""
    return typing.get_args(lit)


# ---- describing and checking one value against its annotation ---------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _bounds(meta) -> list[str]:
    out = []
    for m in meta:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            b = getattr(m, name, None)
            if b is not None:
                out.append(f"{sym} {_fmt(b)}")
    return out


def _ok_bounds(v, meta) -> bool:
    for m in meta:
        for name, op in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b), ("le", lambda a, b: a <= b),
                         ("lt", lambda a, b: a < b)):
            b = getattr(m, name, None)
            if b is not None and not op(v, b):
                return False
    return True


def union_members(ann) -> list:
    origin = typing.get_origin(ann)
    if origin is Union or (sys.version_info >= (3, 10) and isinstance(ann, types.UnionType)):
        return [m for a in typing.get_args(ann) for m in union_members(a)]
    return [ann]


def member_kind(ann):
    """-> ("bool"|"int"|"float"|"literal"|"none", payload) for a checkable member, None for one that is not."""
    meta: tuple = ()
    if typing.get_origin(ann) is Annotated:
        ann, *rest = typing.get_args(ann)
        meta = tuple(rest)
    if ann is type(None) or ann is None:
        return ("none", None)
    if ann is bool:
        return ("bool", None)
    if ann is int:
        return ("int", meta)
    if ann is float:
        return ("float", meta)
    if typing.get_origin(ann) is Literal:
        return ("literal", typing.get_args(ann))
    return None


def domain(ann) -> list | None:
    """The checkable members of an annotation, or None when any member is unchecked (``str``, ``dict``, ...):
    then the value is left to the code that uses it."""
    kinds = [member_kind(m) for m in union_members(ann)]
    if not kinds or any(k is None for k in kinds):
        return None
    return kinds


def describe(kinds: list) -> str:
    parts = []
    for kind, p in kinds:
        if kind == "bool":
            parts.append("true or false")
        elif kind == "none":
            parts.append("null")
        elif kind == "literal":
            parts.extend(_fmt(v) for v in p)
        else:
            what = "a whole number" if kind == "int" else "a number"
            b = _bounds(p)
            parts.append(what + (" " + " and ".join(b) if b else ""))
    return ", ".join(parts)


def _accepts(kind: str, p, v) -> bool:
    if kind == "none":
        return v is None
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "literal":
        return any(v == c and type(v) is type(c) for c in p)
    if isinstance(v, bool):
        return False
    if kind == "int":
        return isinstance(v, int) and _ok_bounds(v, p)
    return isinstance(v, (int, float)) and v == v and _ok_bounds(v, p)  # float: NaN is outside every domain


def check_value(key: str, value, ann) -> None:
    """Refuse ``value`` for ``key`` when it is outside the domain ``ann`` declares (one line naming the key)."""
    kinds = domain(ann)
    if kinds is None or any(_accepts(k, p, value) for k, p in kinds):
        return
    shown = repr(value) if isinstance(value, str) else _fmt(value)
    if all(k in ("literal", "none") for k, _ in kinds):
        raise XmxError(f"{key}={shown}; valid choices: {describe(kinds)}")
    raise XmxError(f"{key}={shown}: must be {describe(kinds)}; set {key}=<value>")


# ---- the annotations of a ``_target_`` ----------------------------------------------------------------------------
def target_domains(target: str) -> dict[str, object]:
    """{keyword: annotation} of what a ``_target_`` accepts, following ``**kwargs`` up the class hierarchy (the
    subclass's annotation wins). Library classes count too (Lightning's ``Trainer`` and callbacks, torch's optimisers
    declare ``bool``/``Optional[int]``/``Literal`` settings the same way)."""
    from hydra._internal.utils import _locate
    try:
        obj = _locate(target)
    except Exception:  # noqa: BLE001 - Hydra reports a missing target itself
        return {}
    out: dict[str, object] = {}
    for c in (obj.__mro__ if inspect.isclass(obj) else (obj,)):
        if inspect.isclass(obj) and "__init__" not in vars(c):
            continue
        fn = c.__init__ if inspect.isclass(obj) else c
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            break
        globs = getattr(inspect.unwrap(fn), "__globals__", {})
        for p in params:
            if p.name in out or p.annotation is inspect.Parameter.empty or p.kind not in (
                    p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                continue
            ann = p.annotation
            if isinstance(ann, str):  # ``from __future__ import annotations``
                try:
                    ann = eval(ann, dict(globs), {})  # noqa: S307 - the class's own annotation text
                except Exception:  # noqa: BLE001 - an annotation naming a type-checking-only import
                    continue
            out[p.name] = ann
        if not any(p.kind == p.VAR_KEYWORD for p in params) or c is object:
            break
    return out


def check_values(cfg) -> None:
    """Every value whose domain is declared (a ``_target_``'s annotations, :data:`CONFIG_KEYS`) is inside it.
    The method is checked first: other nodes read some of its values by interpolation (``data.view_sampling``), and
    the line names the key the user sets."""
    from omegaconf import DictConfig, OmegaConf

    from omegaconf.errors import MissingMandatoryValue

    _skip = object()

    def value(node, k, full):
        """The resolved value; a mandatory value left unset (``???``) is one line naming the key; an interpolation
        that does not resolve is left to the code that reads it (it may not be read in this run)."""
        try:
            return node[k]
        except MissingMandatoryValue as e:
            e.full_key = full
            raise XmxError(missing_line(e)) from None
        except Exception:  # noqa: BLE001
            return _skip

    def walk(node, prefix: str):
        if not isinstance(node, DictConfig):
            return
        target = node.get("_target_") if "_target_" in node else None
        doms = target_domains(target) if isinstance(target, str) else {}
        for k in node.keys():
            k = str(k)
            if k.startswith("_"):
                continue
            full = f"{prefix}.{k}" if prefix else k
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, full)
            elif k in doms or node._get_node(k)._is_missing():
                v = value(node, k, full)
                if v is not _skip and k in doms:
                    check_value(full, v, doms[k])

    tops = [str(k) for k in cfg.keys() if str(k) != "hydra" and isinstance(cfg._get_node(k), DictConfig)]
    if "method" in tops:
        walk(cfg._get_node("method"), "method")
    for key, ann in CONFIG_KEYS.items():
        try:
            present = OmegaConf.select(cfg, key, default="\0missing", throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001
            present = None
        if present != "\0missing":
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            v = value(node, leaf, key)
            if v is not _skip:
                check_value(key, v, ann)
    for top in tops:
        if top != "method":
            walk(cfg._get_node(top), top)
