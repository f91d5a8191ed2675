"""CLIP-family backbones saved by Hugging Face transformers (``CLIPModel``, ``SiglipModel``; ``save_pretrained``
folders, or hub names from the local cache), behind the same interface as :class:`xmx.backbones.clip.CLIPBackbone`.

The model's own parts are used as transformers runs them: ``get_image_features`` / the text model with its pooling
(CLIP: the end-of-text token; SigLIP: the last position, through its head), the stored ``logit_scale`` and, for
SigLIP, ``logit_bias``. The preprocessing comes from the folder's ``preprocessor_config.json`` (mean/std, the
resampling filter, ``shortest`` = resize the short side + centre crop when the processor centre-crops, else ``squash``
= resize to the square input size, as SigLIP's processor does). Text is tokenized by the saved tokenizer, padded to the
model's full context (``padding="max_length"``, as both were trained) and encoded without an attention mask: CLIP
pools at the end-of-text token behind a causal mask, and SigLIP was trained on padded sequences without one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from xmx.backbones.clip import ClipLikeBackbone
from xmx.backbones.weights import error_line, offline, sha256_file
from xmx.errors import XmxError

log = logging.getLogger(__name__)

SUPPORTED = ("clip", "siglip")  # transformers model_type values
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL filter ids in preprocessor_config.json
_PRECISION = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns model outputs from get_*_features (pooler_output projected); 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def _weights_digest(folder: Path) -> tuple[list[str], str]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise XmxError(f"backbone.name_or_path: {folder} holds no weights (.safetensors or .bin); it must be a folder "
                       "written by save_pretrained")
    if len(files) == 1:
        return [files[0].name], sha256_file(files[0])
    import hashlib
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return [f.name for f in files], h.hexdigest()


def _resolve_folder(name_or_path: str, cache_dir: str | None) -> Path:
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path.resolve()
    if os.sep in str(name_or_path) and not path.exists() and str(name_or_path).count("/") != 1:
        raise XmxError(f"backbone.name_or_path: folder not found: {path}")
    from huggingface_hub import snapshot_download
    try:  # a hub name: the local cache only when offline
        return Path(snapshot_download(str(name_or_path), cache_dir=cache_dir, local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        why = ("is not a local folder and not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline()
               else f"could not be downloaded ({error_line(e, 80)})")
        raise XmxError(f"backbone.name_or_path: {name_or_path} {why}; pass a folder written by save_pretrained "
                       "(config.json, model.safetensors, tokenizer and preprocessor_config.json)") from None


def preprocess_from_config(folder: Path, image_size: int) -> dict:
    """The image processor's settings -> {mean, std, interpolation, resize_mode, size} (xmx / open_clip names)."""
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        raise XmxError(f"backbone.name_or_path: {folder} has no preprocessor_config.json; save the model's processor "
                       "with it (processor.save_pretrained(folder)) so the preprocessing is the model's own")
    cfg = json.loads(f.read_text(encoding="utf-8"))
    crop = bool(cfg.get("do_center_crop", False))
    size = cfg.get("crop_size") if crop else cfg.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", image_size))
    resample = cfg.get("resample", 3)
    return {"mean": [float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5))],
            "std": [float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5))],
            "interpolation": _RESAMPLE.get(int(resample), "bicubic") if isinstance(resample, int) else "bicubic",
            "resize_mode": "shortest" if crop else "squash", "size": int(size or image_size)}


class HFCLIPBackbone(ClipLikeBackbone):
    """A frozen transformers ``CLIPModel`` / ``SiglipModel`` in eval mode; raw (unnormalised) outputs."""

    def __init__(self, name_or_path: str, name: str | None = None, precision: str = "fp32",
                 cache_dir: str | None = None):
        super().__init__()
        if precision not in _PRECISION:
            raise XmxError(f"backbone.precision={precision!r}; valid choices: {', '.join(_PRECISION)}")
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        folder = _resolve_folder(name_or_path, cache_dir)
        if not (folder / "config.json").is_file():
            raise XmxError(f"backbone.name_or_path: {folder} has no config.json; it must be a folder written by "
                           "save_pretrained")
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise XmxError(f"backbone.name_or_path: cannot read {folder}/config.json ({error_line(e, 100)})") from None
        if config.model_type not in SUPPORTED:
            raise XmxError(f"backbone.name_or_path: {folder} holds a {config.model_type!r} model; backbone=hf_clip "
                           f"supports {', '.join(SUPPORTED)} (CLIPModel, SiglipModel); for open_clip weights use "
                           "backbone=open_clip")
        files, digest = _weights_digest(folder)
        try:
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=_PRECISION[precision])
            self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken folder
            raise XmxError(f"backbone.name_or_path: cannot load the model and tokenizer from {folder} "
                           f"({error_line(e, 120)})") from None
        self.model.eval().requires_grad_(False)
        self.model_type = config.model_type
        self.name = name or folder.name
        self.arch = f"{type(self.model).__name__}"
        self.precision = precision
        self.folder = folder
        vis = config.vision_config
        pp = preprocess_from_config(folder, int(vis.image_size))
        if pp["size"] != int(vis.image_size):
            raise XmxError(f"backbone: {folder}'s processor makes {pp['size']} px images but the vision model takes "
                           f"{vis.image_size}; fix preprocessor_config.json")
        self.image_size = int(vis.image_size)
        self.image_mean, self.image_std = tuple(pp["mean"]), tuple(pp["std"])
        self.interpolation, self.resize_mode = pp["interpolation"], pp["resize_mode"]
        self.weights_info = {"source": str(name_or_path), "file": str(folder / files[0]), "files": files,
                             "sha256": digest, "random_init": False, "quick_gelu": None}
        tc = config.text_config
        self._context_length = int(tc.max_position_embeddings)
        self._text_width = int(tc.hidden_size)
        self._embed_dim = int(getattr(config, "projection_dim", None) if self.model_type == "clip"
                              else (getattr(tc, "projection_size", None) or tc.hidden_size))
        self.eos_id = getattr(tc, "eos_token_id", None)
        # CLIP pools at the first end-of-text token (configs from before transformers PR 24773, eos id 2: the
        # largest id); SigLIP at the last position
        self.pool_type = ("argmax" if self.eos_id == 2 else "eos") if self.model_type == "clip" else "last"
        self.pad_id = self.hf_tokenizer.pad_token_id if self.hf_tokenizer.pad_token_id is not None else 0

    # ---- sizes and records ------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def text_width(self) -> int:
        return self._text_width

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def causal_text(self) -> bool:
        """CLIP's text attention is causal; SigLIP's is bidirectional over the padded sequence."""
        return self.model_type == "clip"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.vision_model.parameters()).dtype

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "loader": "transformers", "model_type": self.model_type,
                "model_class": type(self.model).__name__, "image_tower": type(self.model.vision_model).__name__,
                "text_tower": f"hf:{type(self.model.text_model).__name__}", "text_pool": self.pool_type,
                "tokenizer": f"{type(self.hf_tokenizer).__name__} ({self.folder.name})", "precision": self.precision,
                "embed_dim": self.embed_dim, "preprocess": {**self.preprocess, "source": "preprocessor_config.json"},
                "logit_scale": self.logit_scale, "logit_bias": self.logit_bias, "score": self.score,
                **self.weights_info}

    # ---- images -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        """images [B,3,H,W] (normalised with the processor's mean/std) -> pooled, projected embeddings [B,C]; with
        ``project=False`` (CLIP only) the pooled features before ``visual_projection`` [B,D]."""
        images = images.to(self.device, self.dtype)
        if project:
            return _features(self.model.get_image_features(pixel_values=images))
        self.image_projection()  # refuses models without a separate final projection
        return self.model.vision_model(pixel_values=images).pooler_output

    def image_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP's ``visual_projection`` as ``(P [D,C], None)``: ``encode_image(x) = encode_image(x, False) @ P``."""
        proj = getattr(self.model, "visual_projection", None)
        if not isinstance(proj, nn.Linear):
            self.refuse("pre-projection image features", f"{self.arch} pools through its attention head, with no "
                        "separate final image projection")
        return proj.weight.detach().float().T.contiguous(), (None if proj.bias is None else
                                                              proj.bias.detach().float().clone())

    @property
    def pre_projection_dim(self) -> int:
        return int(self.image_projection()[0].shape[0])

    # ---- text -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> token ids [N, context_length], padded to the full context as the models were trained."""
        return self.hf_tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                                 return_tensors="pt")["input_ids"]

    def _token_embedding_module(self) -> nn.Embedding:
        tm = self.model.text_model
        emb = getattr(getattr(tm, "embeddings", None), "token_embedding", None)
        return emb if emb is not None else tm.get_input_embeddings()

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> input token embeddings [N,L,W] (what prompt learning replaces)."""
        return self._token_embedding_module()(tokens.to(self.device))

    def _text(self, tokens: torch.Tensor, embeddings: torch.Tensor | None = None):
        """(last hidden states [N,L,W] after the final norm, pooled + projected [N,C]) through transformers' own text
        model; ``embeddings`` replace the token embeddings (a forward hook), positions and masks stay the model's."""
        tokens = tokens.to(self.device)
        handle = None
        if embeddings is not None:
            handle = self._token_embedding_module().register_forward_hook(
                lambda _m, _i, _o: embeddings.to(self.device, _o.dtype))
        try:
            out = self.model.text_model(input_ids=tokens)
        finally:
            if handle is not None:
                handle.remove()
        pooled = out.pooler_output
        if self.model_type == "clip":  # CLIP projects outside the text model; SigLIP's head is inside it
            pooled = self.model.text_projection(pooled)
        return out.last_hidden_state, pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> pooled, projected text embeddings [N,C]."""
        return self._text(tokens)[1]

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """input token embeddings [N,L,W] + the token ids (for pooling) [N,L] -> pooled text embeddings [N,C]."""
        return self._text(tokens, embeddings)[1]

    def encode_text_tokens(self, tokens: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids [N,L] -> (per-token last-layer features [N,L,C or W], valid mask [N,L])."""
        tokens = tokens.to(self.device)
        x, _ = self._text(tokens)
        if project:
            x = self.model.text_projection(x) if self.model_type == "clip" else self.model.text_model.head(x)
        return x, self.valid_tokens(tokens)
