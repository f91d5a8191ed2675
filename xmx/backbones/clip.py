"""CLIP backbones through open_clip: a frozen model plus the encoder entry points every method family needs.

``weights`` is an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...), a path to a local checkpoint
(OpenAI ``.pt``, open_clip ``.bin``/``.pt``/``.safetensors``), or ``null`` for random initialisation (tests,
benchmarks; never an accuracy). OpenAI weights run with QuickGELU, as they were trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")  # registers `xmx-tiny`

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


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


def resolve_clip_weights(model: str, weights: str | None, cache_dir: str | None = None) -> dict:
    """Turn ``weights`` into a local checkpoint file (or none, for random init) without ever hanging offline.

    Returns ``{"source", "file", "sha256", "random_init", "quick_gelu"}``; raises :class:`XmxError` with one
    actionable line when a tag is unknown, a file is missing, or tagged weights are not available offline.
    """
    if weights in (None, "", "random", "none"):
        return {"source": "random-init", "file": None, "sha256": None, "random_init": True, "quick_gelu": False}
    weights = str(weights)
    local_hint = (f"pass a local checkpoint instead: backbone.weights=/path/to/{model}.pt "
                  "(OpenAI .pt, open_clip .bin or .safetensors)")
    if _looks_like_path(weights) or Path(weights).expanduser().is_file():
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise XmxError(f"backbone.weights: checkpoint file not found: {path} ({local_hint.split(': ', 1)[1]})")
        return {"source": str(path), "file": str(path), "sha256": sha256_file(path), "random_init": False,
                "quick_gelu": _is_torchscript_archive(path)}

    cfg = open_clip.get_pretrained_cfg(model, weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise XmxError(f"backbone.weights: unknown pretrained tag {weights!r} for {model}; "
                       f"valid tags: {', '.join(tags) or 'none'}; or {local_hint}")
    info = {"source": f"open_clip:{model}/{weights}", "random_init": False,
            "quick_gelu": bool(cfg.get("quick_gelu", False))}
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hub = cfg.get("hf_hub", "")
    path = None
    if hub:  # look in the local Hugging Face cache first: no network needed when the file is there
        from huggingface_hub import hf_hub_download
        repo, filename = os.path.split(hub)
        try:
            path = hf_hub_download(repo, filename or "open_clip_pytorch_model.bin", cache_dir=cache_dir,
                                   local_files_only=True)
        except Exception:  # noqa: BLE001 - any miss means "not cached"
            path = None
    if path is None and offline:
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


def _unreadable(file, model: str, e: BaseException) -> XmxError:
    why = (str(e).splitlines() or [""])[0][:100]
    why = "" if "weights_only" in why or not why else f": {why}"  # torch's advice to unpickle anything: not ours
    return XmxError(f"backbone.weights: {file} is not a readable {model} checkpoint ({type(e).__name__}{why}); "
                    f"pass an open_clip/OpenAI checkpoint file of {model}, or a pretrained tag")


class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP model in eval mode.

    Every encoder output is *raw* (before L2 normalisation): methods normalise where their equations say so.
    """

    def __init__(self, model: str, weights: str | None = None, precision: str = "fp32",
                 quick_gelu: bool | str = "auto", cache_dir: str | None = None, name: str | None = None):
        super().__init__()
        self.name = name or model
        self.arch = model
        self.precision = precision
        self.weights_info = resolve_clip_weights(model, weights, cache_dir)
        qg = self.weights_info["quick_gelu"] if quick_gelu in ("auto", None) else bool(quick_gelu)
        self.weights_info["quick_gelu"] = qg
        try:
            self.model = open_clip.create_model(model, pretrained=self.weights_info["file"], precision=precision,
                                                force_quick_gelu=qg, cache_dir=cache_dir)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" in str(e):
                raise XmxError(f"backbone.weights: checkpoint {self.weights_info['file']} does not fit "
                               f"{model} (state_dict mismatch); pick the backbone that matches the file") from None
            if self.weights_info.get("file"):
                raise _unreadable(self.weights_info["file"], model, e) from None
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
                AttributeError, TypeError) as e:
            if self.weights_info.get("file"):  # not a checkpoint at all: a clear line, not torch.load's advice
                raise _unreadable(self.weights_info["file"], model, e) from None
            raise
        if not isinstance(self.model, open_clip.CLIP):
            raise XmxError(f"backbone.model: {model} is not a plain CLIP model (custom text towers are not supported)")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        pp = self.model.visual.preprocess_cfg
        self.image_size = int(pp["size"] if isinstance(pp["size"], int) else pp["size"][0])
        self.image_mean = tuple(pp["mean"])
        self.image_std = tuple(pp["std"])
        self.interpolation = pp.get("interpolation", "bicubic")

    def train(self, mode: bool = True):  # frozen encoders stay in eval mode (no dropout / BN updates)
        return super().train(False)

    # ---- sizes ------------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def text_width(self) -> int:
        return self.model.transformer.width

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def logit_scale(self) -> float:
        """CLIP's stored logit scale (the log of the multiplier)."""
        return float(self.model.logit_scale.detach().float().reshape(-1)[0])

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype if hasattr(self.model.visual, "conv1") else torch.float32

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "precision": self.precision, "embed_dim": self.embed_dim,
                **self.weights_info}

    # ---- images -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        """images [B,3,H,W] (CLIP-normalised) -> pooled embeddings [B,C]; with ``project=False`` the features
        *before* the image encoder's final linear projection [B,D] (``raw = pre @ P + b``, see
        :meth:`image_projection`)."""
        images = images.to(self.device, self.dtype)
        if project:
            return self.model.encode_image(images)
        with self._image_projection_removed():
            return self.model.encode_image(images)

    @contextlib.contextmanager
    def _image_projection_removed(self):
        """Within the block the image encoder stops before its final projection: a ViT's ``proj`` matrix is
        unset; a ModifiedResNet's attention-pool output projection ``c_proj`` becomes the identity (as ProLIP's
        release does it)."""
        v = self.model.visual
        if isinstance(getattr(v, "proj", None), torch.Tensor):
            saved = v.proj
            v.proj = None
            try:
                yield
            finally:
                v.proj = saved
        elif hasattr(v, "attnpool") and isinstance(getattr(v.attnpool, "c_proj", None), nn.Linear):
            saved = v.attnpool.c_proj
            d = saved.in_features
            ident = nn.Linear(d, d).to(saved.weight.device, saved.weight.dtype).requires_grad_(False)
            with torch.no_grad():
                ident.weight.copy_(torch.eye(d))
                ident.bias.zero_()
            v.attnpool.c_proj = ident
            try:
                yield
            finally:
                v.attnpool.c_proj = saved
        else:
            raise XmxError(f"backbone {self.arch}: its image encoder has no final linear projection xmx knows "
                           "(ViT proj or ResNet attnpool.c_proj); pre-projection features are not available")

    def image_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image encoder's final projection as ``(P [D,C], b [C] or None)`` (fp32 copies, detached):
        ``encode_image(x) = encode_image(x, project=False) @ P + b``."""
        v = self.model.visual
        if isinstance(getattr(v, "proj", None), torch.Tensor):
            return v.proj.detach().float().clone(), None
        if hasattr(v, "attnpool") and isinstance(getattr(v.attnpool, "c_proj", None), nn.Linear):
            c = v.attnpool.c_proj
            return c.weight.detach().float().T.contiguous(), c.bias.detach().float().clone()
        raise XmxError(f"backbone {self.arch}: its image encoder has no final linear projection xmx knows "
                       "(ViT proj or ResNet attnpool.c_proj)")

    @property
    def pre_projection_dim(self) -> int:
        """Width D of the features before the image projection."""
        return int(self.image_projection()[0].shape[0])

    # ---- text -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> token ids [N, context_length] (BPE, SOT/EOT, zero padded)."""
        return self.tokenizer(list(texts))

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> input token embeddings [N,L,W] (what prompt learning replaces)."""
        return self.model.token_embedding(tokens.to(self.device))

    def _text_transformer(self, x: torch.Tensor) -> torch.Tensor:
        """[N,L,W] input embeddings -> [N,L,W] last-layer states. ``L`` may be shorter than ``context_length``:
        attention is causal, so the states up to a position do not depend on the positions after it, and a batch
        cut after its last end-of-text token gives the same pooled features (prompt learning uses that)."""
        m = self.model
        cast = m.transformer.get_cast_dtype()
        L = x.shape[1]
        if L > m.positional_embedding.shape[0]:
            raise XmxError(f"text encoder: {L} tokens exceed the context length {m.positional_embedding.shape[0]}")
        x = x.to(cast) + m.positional_embedding[:L].to(cast)
        mask = m.attn_mask
        x = m.transformer(x, attn_mask=None if mask is None else mask[:L, :L])
        return m.ln_final(x)  # [N,L,W]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> pooled text embeddings [N,C] (at the end-of-text token)."""
        return self.encode_text_from_embeddings(self.token_embedding(tokens), tokens)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """input token embeddings [N,L,W] (e.g. with learned context vectors) + the token ids that locate the
        end-of-text token [N,L] -> pooled text embeddings [N,C]."""
        x = self._text_transformer(embeddings)
        eot = tokens.to(x.device).argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        return self._project(x[torch.arange(x.shape[0], device=x.device), eot])

    def encode_text_tokens(self, tokens: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids [N,L] -> (per-token last-layer features [N,L,C or W], valid mask [N,L]; True up to and
        including the end-of-text token)."""
        tokens = tokens.to(self.device)
        x = self._text_transformer(self.token_embedding(tokens))
        if project:
            x = self._project(x)
        eot = tokens.argmax(dim=-1, keepdim=True)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot
        return x, valid

    @torch.no_grad()
    def text_classifier(self, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Zero-shot classifier W [C,N] (spec §0): per class, fill every template with the class name
        (underscores -> spaces), encode, normalise, average over templates, normalise again.
        ``normalize=False``: the plain mean of the *raw* prompt embeddings (TaskRes's base classifier)."""
        if not classnames:
            raise XmxError("text classifier: the class list is empty; check the dataset's class names")
        if not templates:
            raise XmxError("text classifier: no prompt templates; set data.templates or use the dataset default")
        prompts = [t.format(c.replace("_", " ")) for c in classnames for t in templates]
        feats = []
        for i in range(0, len(prompts), batch_size):
            f = self.encode_text(self.tokenize(prompts[i:i + batch_size])).float()
            feats.append(F.normalize(f, dim=-1) if normalize else f)
        per_prompt = torch.cat(feats).view(len(classnames), len(templates), -1)
        if not normalize:
            return per_prompt.mean(dim=1).T.contiguous()  # [C,N]
        return F.normalize(F.normalize(per_prompt.mean(dim=1), dim=-1), dim=-1).T.contiguous()  # [C,N]
