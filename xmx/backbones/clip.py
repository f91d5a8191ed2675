"""CLIP-family backbones through open_clip: a frozen model plus the encoder entry points every method family needs.

Any model open_clip knows works: OpenAI CLIP, SigLIP / SigLIP 2, EVA-02, MobileCLIP, DFN, MetaCLIP, PE-Core, ...
(``backbone.model`` = an ``open_clip.list_models()`` name, an ``hf-hub:org/repo`` or ``local-dir:/folder`` id, or a
path to a model-config ``.json``). ``backbone.weights`` is

- an open_clip pretrained tag (``openai``, ``webli``, ``dfn5b``, ...; ``open_clip.list_pretrained_tags_by_model``),
- a local checkpoint file (OpenAI ``.pt``, open_clip ``.bin``/``.pt``/``.safetensors``),
- ``hf-hub:org/repo`` (an open_clip repository on the Hugging Face hub: its ``open_clip_config.json`` gives the
  architecture and preprocessing) or a local folder in that layout,
- or ``null`` for random initialisation (tests, benchmarks; never an accuracy).

Respecting the backbone: the preprocessing (image size, mean/std, interpolation, resize mode such as SigLIP's
``squash``) is the one the weights were trained with (the tag's, or ``backbone.preprocess_tag``'s when the weights
are a file or random), recorded in :meth:`describe` and in every feature-store key; ``logit_scale`` and
``logit_bias`` are the model's own (SigLIP scores with ``sigmoid(exp(s)·cos + b)``: :attr:`score` is ``sigmoid``).
OpenAI weights run with QuickGELU, as they were trained.

Text towers: open_clip's own transformer (in ``CLIP`` or ``CustomTextCLIP``; causal or bidirectional, pooled at the
end-of-text token, the last or the first position) supports every entry point, prompt learning included; a Hugging
Face text tower (``hf_model_name``, e.g. XLM-R) supports ``encode_text`` and the zero-shot classifier only, and the
token-level entry points refuse it in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from xmx.backbones.weights import (INTERPOLATIONS, RESIZE_MODES, error_line, offline,  # noqa: F401 - re-exported
                                   resolve_clip_weights, resolve_model_name, resolve_preprocess, sha256_file,
                                   unreadable_weights)
from xmx.errors import XmxError

log = logging.getLogger(__name__)

import xmx.backbones.tiny  # noqa: F401,E402 - registers the tiny timm towers the `xmx-tiny-*` configs use

open_clip.add_model_config(Path(__file__).parent / "model_configs")  # registers the `xmx-tiny*` test models

# ---- tokenizers ----------------------------------------------------------------------------------------------------
class StandInTokenizer:
    """A byte-level tokenizer for *random-init* models whose own tokenizer is not available offline (e.g. SigLIP's
    sentencepiece model on a machine that never downloaded it): ids fit the vocabulary, the end-of-text token sits
    where the text tower pools. Never used with trained weights (their tokenizer is part of the model)."""

    def __init__(self, context_length: int, vocab_size: int, pool_type: str, pad_id: int = 0):
        self.context_length, self.vocab_size, self.pool_type, self.pad_id = context_length, vocab_size, pool_type, pad_id
        self.eot = vocab_size - 1 if pool_type == "argmax" else 2
        self.sot = 1 if pool_type == "argmax" else None

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = context_length or self.context_length
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [b % (self.vocab_size - 4) + 3 for b in t.lower().encode("utf-8")]
            ids = ([self.sot] if self.sot is not None else []) + ids[:L - 2] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def build_tokenizer(model_name: str, text_cfg: dict, tokenizer: str | None, random_init: bool,
                    cache_dir: str | None, pool_type: str, pad_id: int):
    """(tokenizer, description). ``tokenizer``: null = the model's own (open_clip.get_tokenizer); a local folder or
    a hub name = a Hugging Face tokenizer with the model's context length and kwargs."""
    context_length = int(text_cfg.get("context_length", 77))
    try:
        if tokenizer in (None, "", "auto"):
            tok = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
            src = text_cfg.get("hf_tokenizer_name") or type(tok).__name__
            return tok, str(src)
        kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        return open_clip.tokenizer.HFTokenizer(str(tokenizer), context_length=context_length, cache_dir=cache_dir,
                                               **kwargs), str(tokenizer)
    except Exception as e:  # noqa: BLE001 - HF hub / file errors come in many types
        name = tokenizer or text_cfg.get("hf_tokenizer_name") or model_name
        if random_init and tokenizer in (None, "", "auto"):
            log.warning("backbone: tokenizer %s is not available (%s); random-init weights use a byte-level stand-in",
                        name, error_line(e, 80))
            return (StandInTokenizer(context_length, int(text_cfg.get("vocab_size", 49408)), pool_type, pad_id),
                    f"stand-in (bytes; {name} not available offline)")
        raise XmxError(f"backbone.tokenizer: could not load the tokenizer {name} ({error_line(e, 100)}); download it "
                       "once online or set backbone.tokenizer=/path/to/tokenizer-folder") from None


# ---- the backbone --------------------------------------------------------------------------------------------------
class ClipLikeBackbone(nn.Module):
    """What every CLIP-family backbone shares (open_clip and transformers alike): frozen eval mode, the zero-shot
    classifier, the model's own logit scale and bias, and the preprocessing record."""

    name: str
    image_size: int
    image_mean: tuple
    image_std: tuple
    interpolation: str
    resize_mode: str

    def train(self, mode: bool = True):  # frozen encoders stay in eval mode (no dropout / BN updates)
        return super().train(False)

    # the model's logit parameters: both loaders keep them on ``self.model`` (open_clip and transformers alike)
    def _logit_scale_param(self) -> torch.Tensor:
        return self.model.logit_scale

    def _logit_bias_param(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def valid_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N,L] bool: the positions that carry the text (up to and including end-of-text for argmax/eos pooling;
        the non-padding positions for models that pool at a fixed position, such as SigLIP). Uses the subclass's
        ``pool_type``, ``eos_id`` and ``pad_id``."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        if self.pool_type == "argmax":
            return pos <= tokens.argmax(dim=-1, keepdim=True)
        if self.pool_type == "eos" and self.eos_id is not None:
            return pos <= (tokens == self.eos_id).int().argmax(dim=-1, keepdim=True)
        valid = tokens != self.pad_id
        valid[:, 0] = True
        return valid

    @property
    def logit_scale(self) -> float:
        """The stored logit scale (the log of the multiplier)."""
        return float(self._logit_scale_param().detach().float().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        """The learned logit bias of sigmoid-loss models (SigLIP), else None."""
        b = self._logit_bias_param()
        return None if b is None else float(b.detach().float().reshape(-1)[0])

    @property
    def score(self) -> str:
        """How the model turns logits into probabilities: ``sigmoid`` (SigLIP: one binary match per class) or
        ``softmax`` (CLIP's contrastive loss)."""
        return "sigmoid" if self._logit_bias_param() is not None else "softmax"

    @property
    def preprocess(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.image_mean), "std": list(self.image_std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}

    def logits(self, image_feats: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """CLIP's own logits ``exp(s)·norm(f)·W (+ b)`` [B,N] for raw image features [B,C] and a classifier [C,N]."""
        f = F.normalize(image_feats.float(), dim=-1)
        out = torch.exp(torch.tensor(self.logit_scale)) * f @ W.to(f.device, f.dtype)
        return out if self.logit_bias is None else out + self.logit_bias

    @torch.no_grad()
    def text_classifier(self, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Zero-shot classifier W [C,N] (docs/methods/shared.md#zero-shot-classifier): per class, fill every template
        with the class name
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

    def refuse(self, what: str, why: str) -> None:
        raise XmxError(f"{what} is not supported on backbone {self.name} ({why}); pick another backbone "
                       "(README: tested backbone families and what each method needs)")


class CLIPBackbone(ClipLikeBackbone):
    """A frozen open_clip CLIP-family model in eval mode.

    Every encoder output is *raw* (before L2 normalisation): methods normalise where their equations say so.
    """

    def __init__(self, model: str, weights: str | None = None, precision: str = "fp32",
                 quick_gelu: bool | str = "auto", cache_dir: str | None = None, name: str | None = None,
                 preprocess_tag: str | None = "auto", image_mean=None, image_std=None, interpolation: str | None = None,
                 resize_mode: str | None = None, tokenizer: str | None = None):
        super().__init__()
        if precision not in ("fp32", "fp16", "bf16"):
            raise XmxError(f"backbone.precision={precision!r}; valid choices: fp32, fp16, bf16")
        model = str(model)
        carries_arch = weights is not None and (str(weights).startswith("hf-hub:")
                                                or Path(str(weights)).expanduser().is_dir())
        arch = model if carries_arch else resolve_model_name(model)  # hub / folder weights bring their architecture
        self.weights_info = resolve_clip_weights(arch, weights, cache_dir)
        build_name = self.weights_info.get("schema_model", arch)
        self.name = name or model
        self.arch = build_name
        self.precision = precision
        qg = self.weights_info["quick_gelu"] if quick_gelu in ("auto", None) else bool(quick_gelu)
        self.model_cfg = self._model_cfg(build_name, self.weights_info.get("config_file"))
        self.weights_info["quick_gelu"] = qg or bool(self.model_cfg.get("quick_gelu", False))  # what actually runs
        pp, pp_source = resolve_preprocess(build_name, self.weights_info, preprocess_tag,
                                           {"mean": image_mean, "std": image_std, "interpolation": interpolation,
                                            "resize_mode": resize_mode})
        try:
            self.model = open_clip.create_model(
                build_name, pretrained=None if "schema_model" in self.weights_info else self.weights_info["file"],
                precision=precision, force_quick_gelu=qg, cache_dir=cache_dir, force_preprocess_cfg=pp,
                pretrained_text=False)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" in str(e) or "size mismatch" in str(e):
                raise XmxError(f"backbone.weights: checkpoint {self.weights_info['file']} does not fit "
                               f"{build_name} (state_dict mismatch); pick the backbone.model that matches the file"
                               ) from None
            if self.weights_info.get("file"):
                raise unreadable_weights(self.weights_info["file"], build_name, e) from None
            raise XmxError(f"backbone: could not build {build_name} ({error_line(e)})") from None
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
                AttributeError, TypeError, OSError, AssertionError) as e:
            if self.weights_info.get("file"):  # not a checkpoint at all: a clear line, not torch.load's advice
                raise unreadable_weights(self.weights_info["file"], build_name, e) from None
            if isinstance(e, (KeyError, ValueError, OSError, AssertionError)):  # e.g. a timm model this timm lacks
                raise XmxError(f"backbone: could not build {build_name} ({error_line(e)}); check backbone.model and "
                               "that timm / open_clip_torch are recent enough") from None
            raise
        if not isinstance(self.model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            raise XmxError(f"backbone.model: {build_name} is a {type(self.model).__name__}, not a CLIP-family "
                           "dual encoder (CoCa and generative towers are not supported)")
        self.model.eval().requires_grad_(False)
        self.preprocess_source = pp_source
        vpp = self.model.visual.preprocess_cfg
        size = vpp["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        if not isinstance(size, int) and len(set(size)) != 1:
            raise XmxError(f"backbone: {build_name} takes non-square images {tuple(size)}; only square inputs are "
                           "supported")
        self.image_mean = tuple(float(v) for v in vpp["mean"])
        self.image_std = tuple(float(v) for v in vpp["std"])
        self.interpolation = str(vpp.get("interpolation", "bicubic"))
        self.resize_mode = str(vpp.get("resize_mode", "shortest"))
        if self.resize_mode not in RESIZE_MODES:
            raise XmxError(f"backbone: resize mode {self.resize_mode!r} of {build_name} is not supported; set "
                           f"backbone.resize_mode to one of {', '.join(RESIZE_MODES)}")

        # the text tower: CLIP keeps it inline, CustomTextCLIP in `.text`
        self._text = getattr(self.model, "text", self.model)
        self.text_kind = "hf" if self._text.__class__.__name__ == "HFTextEncoder" else "open_clip"
        if self.text_kind == "open_clip" and getattr(self._text, "cls_emb", None) is not None:
            raise XmxError(f"backbone.model: {build_name}'s text tower appends a class token (CoCa-style); not a "
                           "CLIP-family text encoder")
        self.pool_type = getattr(self._text, "pool_type", None) or getattr(self.model, "text_pool_type", "argmax")
        self.eos_id = getattr(self._text, "eos_id", None) or getattr(self.model, "text_eos_id", None)
        text_cfg = dict(self.model_cfg.get("text_cfg", {}))
        self.pad_id = int(text_cfg.get("pad_id", 0))
        self.tokenizer, self.tokenizer_source = build_tokenizer(
            build_name, text_cfg, tokenizer, self.weights_info["random_init"], cache_dir, self.pool_type, self.pad_id)
        hf_tok = getattr(self.tokenizer, "tokenizer", None)
        if getattr(hf_tok, "pad_token_id", None) is not None:
            self.pad_id = int(hf_tok.pad_token_id)

    @staticmethod
    def _model_cfg(name: str, config_file: str | None = None) -> dict:
        """The architecture config: open_clip's registry, or the hub / folder's ``open_clip_config.json``."""
        if config_file:
            with open(config_file, encoding="utf-8") as f:
                return dict(json.load(f).get("model_cfg") or {})
        return dict(open_clip.get_model_config(name) or {})

    # ---- sizes ------------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """``clip`` (open_clip's own towers) or ``custom_text`` (timm image tower and/or separate text module)."""
        return "clip" if isinstance(self.model, open_clip.CLIP) else "custom_text"

    @property
    def image_tower(self) -> str:
        v = self.model.visual
        return f"timm:{v.trunk.__class__.__name__}" if hasattr(v, "trunk") else v.__class__.__name__

    @property
    def embed_dim(self) -> int:
        if "embed_dim" in self.model_cfg:
            return int(self.model_cfg["embed_dim"])
        proj = self._text.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def text_width(self) -> int:
        self._need_token_level("text_width")
        return int(self._text.transformer.width)

    @property
    def context_length(self) -> int:
        return int(getattr(self._text, "context_length", None) or self.model_cfg["text_cfg"]["context_length"])

    @property
    def causal_text(self) -> bool:
        """True when the text tower's attention is causal (OpenAI, EVA-02, PE): tokens after the pooled end-of-text
        never change a feature, so prompts may be cut there. SigLIP's and MobileCLIP's attend both ways."""
        return self.text_kind == "open_clip" and getattr(self._text, "attn_mask", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's compute dtype: its first conv / linear weight (open_clip's fp16 keeps embeddings fp32)."""
        for m in self.model.visual.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return m.weight.dtype
        return torch.float32

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "loader": "open_clip", "model_class": type(self.model).__name__,
                "image_tower": self.image_tower, "text_tower": f"{self.text_kind}:{type(self._text).__name__}",
                "text_pool": self.pool_type, "tokenizer": self.tokenizer_source, "precision": self.precision,
                "embed_dim": self.embed_dim, "preprocess": {**self.preprocess, "source": self.preprocess_source},
                "logit_scale": self.logit_scale, "logit_bias": self.logit_bias, "score": self.score,
                **{k: v for k, v in self.weights_info.items() if k != "config_file"}}

    # ---- images -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        """images [B,3,H,W] (normalised with the backbone's mean/std) -> pooled embeddings [B,C]; with
        ``project=False`` the features
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
            self.refuse("pre-projection image features", f"its image tower {self.image_tower} has no final linear "
                        "projection xmx knows (open_clip ViT proj or ResNet attnpool.c_proj)")

    def image_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image encoder's final projection as ``(P [D,C], b [C] or None)`` (fp32 copies, detached):
        ``encode_image(x) = encode_image(x, project=False) @ P + b``."""
        v = self.model.visual
        if isinstance(getattr(v, "proj", None), torch.Tensor):
            return v.proj.detach().float().clone(), None
        if hasattr(v, "attnpool") and isinstance(getattr(v.attnpool, "c_proj", None), nn.Linear):
            c = v.attnpool.c_proj
            return c.weight.detach().float().T.contiguous(), c.bias.detach().float().clone()
        self.refuse("the image projection", f"its image tower {self.image_tower} has no final linear projection xmx "
                    "knows (open_clip ViT proj or ResNet attnpool.c_proj)")

    @property
    def pre_projection_dim(self) -> int:
        """Width D of the features before the image projection."""
        return int(self.image_projection()[0].shape[0])

    # ---- text -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> token ids [N, context_length] (the model's own tokenizer, padded as it was trained)."""
        return self.tokenizer(list(texts))

    def _need_token_level(self, what: str) -> None:
        if self.text_kind != "open_clip":
            self.refuse(what, f"its text tower is a Hugging Face {type(self._text.transformer).__name__}; "
                              "token-level text features need an open_clip text transformer")

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> input token embeddings [N,L,W] (what prompt learning replaces)."""
        self._need_token_level("token_embedding (prompt learning)")
        return self._text.token_embedding(tokens.to(self.device))

    def _text_transformer(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower after the token embedding, as open_clip runs it (causal or bidirectional mask, optional
        padding mask, positional embedding, transformer, final LayerNorm) -> [N,L,W]."""
        t = self._text
        cast = t.transformer.get_cast_dtype()
        L = x.shape[1]
        if L > t.positional_embedding.shape[0]:
            raise XmxError(f"text encoder: {L} tokens exceed the context length {t.positional_embedding.shape[0]}")
        x = x.to(cast)
        mask = t.attn_mask
        if mask is not None:
            mask = mask[:L, :L]
        if getattr(t, "use_pad_mask", False):
            add = t._build_additive_mask(tokens.to(x.device), L, x.dtype)
            mask = add if mask is None else mask.unsqueeze(0) + add
        x = x + t.positional_embedding[:L].to(cast)
        x = t.transformer(x, attn_mask=mask)
        return t.ln_final(x)

    def _pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool
        return text_global_pool(x, tokens.to(x.device), self.pool_type, eos_token_id=self.eos_id)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self._text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N,L] -> pooled text embeddings [N,C] (where the model pools: end-of-text, last or first)."""
        if self.text_kind != "open_clip":
            return self.model.encode_text(tokens.to(self.device))
        return self.encode_text_from_embeddings(self.token_embedding(tokens), tokens)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """input token embeddings [N,L,W] (e.g. with learned context vectors) + the token ids that locate the
        pooled position [N,L] -> pooled text embeddings [N,C]."""
        self._need_token_level("encode_text_from_embeddings (prompt learning)")
        x = self._text_transformer(embeddings, tokens)
        return self._project(self._pool(x, tokens))

    def encode_text_tokens(self, tokens: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids [N,L] -> (per-token last-layer features [N,L,C or W], valid mask [N,L] (:meth:`valid_tokens`))."""
        tokens = tokens.to(self.device)
        x = self._text_transformer(self.token_embedding(tokens), tokens)
        if project:
            x = self._project(x)
        return x, self.valid_tokens(tokens)
