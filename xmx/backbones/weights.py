"""Finding, hashing and checking a CLIP backbone's weights, and the preprocessing they were trained with.

``backbone.weights`` may be an open_clip pretrained tag, a local checkpoint file, ``hf-hub:org/repo`` or a local
folder in that layout, or ``null`` (random initialisation); :func:`resolve_clip_weights` turns it into the file (or
tag) open_clip loads, with its source and sha256 (:func:`sha256_file`), and refuses in one line what cannot work
(offline and not cached, a file that is not a checkpoint, a misspelt model name: :func:`resolve_model_name`).
:func:`resolve_preprocess` gives the image size, mean/std, interpolation and resize mode the weights were trained
with. :mod:`xmx.backbones.clip` (the encoder) and :mod:`xmx.backbones.hf_clip` build on these.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import open_clip

from xmx.errors import XmxError

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
_PP_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what a tag / override may set (the size is the model's)
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released `.pt` files are TorchScript archives (they carry `constants.pkl`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _looks_like_path(weights: str) -> bool:
    return (os.sep in weights or weights.startswith((".", "~"))
            or Path(weights).suffix in _CHECKPOINT_SUFFIXES)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def error_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}"


# ---- model names ---------------------------------------------------------------------------------------------------
def resolve_model_name(model: str) -> str:
    """``backbone.model`` -> the name open_clip builds: a known name, ``hf-hub:``/``local-dir:`` as given, a
    model-config ``.json`` registered under its file stem. Unknown names raise one line with the closest matches."""
    model = str(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise XmxError(f"backbone.model: model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None:
        names = open_clip.list_models()
        close = difflib.get_close_matches(model, names, n=6, cutoff=0.5)
        if not close:  # prefix / family matches ("siglip" -> every SigLIP model)
            close = [n for n in names if model.lower() in n.lower()][:6]
        raise XmxError(f"backbone.model: unknown open_clip model {model!r}; close matches: "
                       f"{', '.join(close) or 'none'} (all names: python -c 'import open_clip; "
                       f"print(open_clip.list_models())')")
    return model


def _hub_files(repo: str, cache_dir: str | None) -> tuple[str, str]:
    """(open_clip_config.json, weights file) of an open_clip hub repository, from the local cache when offline."""
    from huggingface_hub import hf_hub_download
    local = offline()
    try:
        cfg = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - a miss comes in many types
        why = "is not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if local else f"failed ({error_line(e)})"
        raise XmxError(f"backbone.weights: hf-hub:{repo}: open_clip_config.json {why}; download it once online "
                       "or pass a local folder (backbone.weights=/path/to/folder with open_clip_config.json and "
                       "the weights)") from None
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            return cfg, hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=local)
        except Exception:  # noqa: BLE001
            continue
    raise XmxError(f"backbone.weights: hf-hub:{repo} has no open_clip weights in "
                   f"{'the local cache' if local else 'the repository'} (open_clip_model.safetensors or "
                   "open_clip_pytorch_model.bin)")


def resolve_clip_weights(model: str, weights: str | None, cache_dir: str | None = None) -> dict:
    """Turn ``weights`` into a local checkpoint file (or none, for random init) without ever hanging offline.

    Returns ``{"source", "file", "sha256", "random_init", "quick_gelu"}`` (+ ``"tag"`` for a pretrained tag,
    ``"schema_model"`` for hub / folder weights, which carry their own architecture); raises :class:`XmxError` with
    one actionable line when a tag is unknown, a file is missing, or tagged weights are not available offline.
    """
    if weights in (None, "", "random", "none"):
        return {"source": "random-init", "file": None, "sha256": None, "random_init": True, "quick_gelu": False}
    weights = str(weights)
    local_hint = (f"pass a local checkpoint instead: backbone.weights=/path/to/{model}.pt "
                  "(OpenAI .pt, open_clip .bin or .safetensors)")
    if weights.startswith("hf-hub:"):
        repo = weights[len("hf-hub:"):].strip("/")
        cfg_file, file = _hub_files(repo, cache_dir)
        return {"source": weights, "file": file, "sha256": sha256_file(file), "random_init": False,
                "quick_gelu": False, "schema_model": f"hf-hub:{repo}", "config_file": cfg_file}
    path = Path(weights).expanduser()
    if path.is_dir():
        cfg_file = path / "open_clip_config.json"
        if not cfg_file.is_file():
            raise XmxError(f"backbone.weights: folder {path} has no open_clip_config.json; an open_clip folder holds "
                           "open_clip_config.json + open_clip_model.safetensors (for a transformers save_pretrained "
                           "folder use backbone=hf_clip backbone.name_or_path=...)")
        from open_clip.factory import _find_checkpoint_in_dir
        file = _find_checkpoint_in_dir(path)
        if file is None:
            raise XmxError(f"backbone.weights: folder {path} has no weights file (.safetensors, .bin or .pth)")
        return {"source": str(path.resolve()), "file": str(file), "sha256": sha256_file(file), "random_init": False,
                "quick_gelu": False, "schema_model": f"local-dir:{path.resolve()}", "config_file": str(cfg_file)}
    if _looks_like_path(weights) or path.is_file():
        path = path.resolve()
        if not path.is_file():
            raise XmxError(f"backbone.weights: checkpoint file not found: {path} ({local_hint.split(': ', 1)[1]})")
        return {"source": str(path), "file": str(path), "sha256": sha256_file(path), "random_init": False,
                "quick_gelu": _is_torchscript_archive(path)}

    cfg = open_clip.get_pretrained_cfg(model, weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise XmxError(f"backbone.weights: {model} has no pretrained tag {weights!r}; its tags: "
                       f"{', '.join(tags) or 'none'}; or {local_hint}")
    info = {"source": f"open_clip:{model}/{weights}", "random_init": False, "tag": weights,
            "quick_gelu": bool(cfg.get("quick_gelu", False))}
    hub = cfg.get("hf_hub", "")
    path = None
    if hub:  # look in the local Hugging Face cache first: no network needed when the file is there
        from huggingface_hub import hf_hub_download
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            try:
                path = hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True)
                break
            except Exception:  # noqa: BLE001 - any miss means "not cached"
                path = None
    if path is None and offline():
        raise XmxError(f"backbone.weights: pretrained weights {model}/{weights} are not in the local cache and "
                       f"the machine is offline (HF_HUB_OFFLINE=1); {local_hint}")
    if path is None:
        try:
            path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise XmxError(f"backbone.weights: could not download {model}/{weights} ({type(e).__name__}); "
                           f"{local_hint}") from None
    info.update(file=str(path), sha256=sha256_file(path))
    return info


def unreadable_weights(file, model: str, e: BaseException) -> XmxError:
    why = (str(e).splitlines() or [""])[0][:100]
    why = "" if "weights_only" in why or not why else f": {why}"  # torch's advice to unpickle anything: not ours
    return XmxError(f"backbone.weights: {file} is not a readable {model} checkpoint ({type(e).__name__}{why}); "
                    f"pass an open_clip/OpenAI checkpoint file of {model}, or a pretrained tag")


def resolve_preprocess(model: str, weights_info: dict, preprocess_tag: str | None = "auto",
                       overrides: dict | None = None) -> tuple[dict, str]:
    """The preprocessing the weights were trained with: ``(open_clip preprocess dict without size, source)``.

    Tagged weights use their tag's; a file or random init uses ``preprocess_tag`` (``auto``: the model's first
    pretrained tag, i.e. its usual preprocessing; ``null``: open_clip's defaults, OpenAI's mean/std); hub / folder
    weights use their ``open_clip_config.json``. Explicit ``overrides`` (``mean``, ``std``, ``interpolation``,
    ``resize_mode``) win."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    pp = asdict(PreprocessCfg())
    source = "open_clip defaults"
    if weights_info.get("config_file"):
        with open(weights_info["config_file"], encoding="utf-8") as f:
            pp = merge_preprocess_dict(pp, json.load(f).get("preprocess_cfg", {}))
        source = "open_clip_config.json"
    else:
        tag = weights_info.get("tag")
        if tag is None and preprocess_tag not in (None, "", "none", "null"):
            if preprocess_tag == "auto":
                tags = open_clip.list_pretrained_tags_by_model(model) if not model.startswith(("hf-hub:", "local-dir:")) else []
                tag = tags[0] if tags else None
            else:
                if not open_clip.get_pretrained_cfg(model, preprocess_tag):
                    raise XmxError(f"backbone.preprocess_tag: {model} has no pretrained tag {preprocess_tag!r}; its "
                                   f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'}; "
                                   "or null (open_clip defaults)")
                tag = preprocess_tag
        if tag:
            pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(model, tag))
            source = f"tag {tag}"
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        if "resize_mode" in given and given["resize_mode"] not in RESIZE_MODES:
            raise XmxError(f"backbone.resize_mode={given['resize_mode']!r}; valid choices: {', '.join(RESIZE_MODES)}")
        if "interpolation" in given and given["interpolation"] not in INTERPOLATIONS:
            raise XmxError(f"backbone.interpolation={given['interpolation']!r}; valid choices: "
                           f"{', '.join(INTERPOLATIONS)}")
        for k in ("mean", "std"):
            if k in given and len(list(given[k])) != 3:
                key = {"mean": "backbone.image_mean", "std": "backbone.image_std"}[k]
                raise XmxError(f"{key} must have 3 values (R, G, B), got {list(given[k])}")
        pp = merge_preprocess_dict(pp, {k: tuple(v) if k in ("mean", "std") else v for k, v in given.items()})
        source += " + overrides (" + ", ".join(sorted(given)) + ")"
    pp.pop("size", None)
    return pp, source
