"""Frozen pre-trained language models (BERT, RoBERTa) for the X-adapter language track.

``build_plm(name_or_path)`` loads ``AutoModelForMaskedLM`` + its tokenizer from a Hugging Face hub name
(``bert-base-uncased``, ``roberta-base``; from the local cache only when ``HF_HUB_OFFLINE=1``) or from a local folder
(``config.json``, weights, tokenizer files). ``build_plm("tiny", kind="bert"|"roberta")`` builds a small randomly
initialised model with a tokenizer constructed offline from a built-in word list (tests, benchmarks; never a number
to report). The model is frozen (``requires_grad=False``) and stays in eval mode unless ``freeze=False`` (the
``finetune_plm`` baseline).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from xmx.errors import XmxError
from xmx.validate import NonNegInt, PosInt

log = logging.getLogger(__name__)

KINDS = ("bert", "roberta")

# The 11 MemoryColor colours (+ ColorTerms' and the US spelling), the VaLM template words and a few hundred common
# words: enough for the tiny tokenizers to keep every probe word whole.
COLOR_WORDS = ("black", "blue", "brown", "green", "grey", "gray", "orange", "pink", "purple", "red", "white",
               "yellow")
_COMMON = """
the of and to a in is was for on that with as by it at from his he her she they their this be are an or which
have has had not but were been one two three first new also after more who its into other when all would there
can will about up out them time we you i my me your our what how where why some many most such only over than
then so these those no yes its may do does did made make used use year years people world city state part
color colour usual usually typical common commonly q answer question it's typically often very inside outside
man woman child boy girl dog cat bird horse cow sheep elephant bear zebra giraffe car bus train truck boat plane
bike street road sign table chair bed room house window door kitchen food pizza cake banana apple orange sandwich
plate bowl cup glass bottle water tree grass sky sun snow field beach ocean sea river mountain park sitting
standing walking riding holding playing looking eating next near front top down side small large big little
old young tall long short several group couple pair person people picture photo image view white black
film series game season album song band team club school university church war army king queen river station
north south east west american british national new york london born died played released known called named
fruit animal meat cheese milk egg eggs yolk tooth wood cardboard paper flour sugar salt pepper chocolate coffee
tea wine blood fire stop light night day morning evening
""".split()


def _word_list() -> list[str]:
    from xmx.data.text import read_color_terms, read_memory_color  # package data, no I/O beyond two small CSVs
    words: list[str] = list(COLOR_WORDS) + list(_COMMON)
    for ds in (read_memory_color(), read_color_terms()):
        for it in ds.items:
            words += (it.descriptor + " " + it.item).split()
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return list(seen)


_PUNCT = list(".,:;?!'\"-()[]/&")


def _tiny_bert_tokenizer(tmp: Path):
    from transformers import BertTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = specials + _PUNCT + letters + ["##" + c for c in letters] + [w for w in _word_list() if w not in letters]
    (tmp / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(tmp), do_lower_case=True, model_max_length=128)


def _tiny_roberta_tokenizer(tmp: Path):
    """Byte-level BPE trained (deterministically) on sentences of the word list, so ``" red"`` is one token."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast
    words = _word_list()
    corpus = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    corpus += [f"The color of it is {w}." for w in words] + [f"{w.capitalize()} {w}" for w in words]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 2, vocab_size=4000, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe.to_str())["model"]
    (tmp / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    from tokenizers import AddedToken  # as roberta-base: "<mask>" swallows the space before it
    return RobertaTokenizerFast.from_pretrained(str(tmp), model_max_length=128,
                                                mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))


def build_tiny_plm(kind: str = "bert", hidden: int = 64, layers: int = 3, heads: int = 4, seed: int = 0):
    """A random-init BERT/RoBERTa MLM (``layers`` x ``hidden``) + an offline tokenizer; deterministic in ``seed``."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM
    with tempfile.TemporaryDirectory(prefix="xmx-tiny-tok-") as tmp:
        tok = _tiny_bert_tokenizer(Path(tmp)) if kind == "bert" else _tiny_roberta_tokenizer(Path(tmp))
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        if kind == "bert":
            model = BertForMaskedLM(BertConfig(max_position_embeddings=128, pad_token_id=tok.pad_token_id, **common))
        else:
            model = RobertaForMaskedLM(RobertaConfig(max_position_embeddings=130, type_vocab_size=1,
                                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                     eos_token_id=tok.eos_token_id, **common))
    return model, tok


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_pretrained(name_or_path: str, cache_dir: str | None):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    path = Path(name_or_path).expanduser()
    is_path = path.exists() or os.sep in name_or_path or name_or_path.startswith((".", "~"))
    hint = (f"pass a local folder instead: plm.name_or_path=/path/to/{path.name} (holding config.json, the model "
            "weights and the tokenizer files, e.g. from `save_pretrained`)")
    if is_path:
        if not path.is_dir():
            raise XmxError(f"plm.name_or_path: local model folder not found: {path}; {hint.split(': ', 1)[1]}")
        if not (path / "config.json").is_file():
            raise XmxError(f"plm.name_or_path: {path} has no config.json; it must be a folder written by "
                           "save_pretrained")
        src, local_only = str(path), True
    else:
        src, local_only = name_or_path, _offline()
    try:
        model = AutoModelForMaskedLM.from_pretrained(src, cache_dir=cache_dir, local_files_only=local_only)
        tok = AutoTokenizer.from_pretrained(src, cache_dir=cache_dir, local_files_only=local_only)
    except (OSError, ValueError) as e:
        if is_path:
            raise XmxError(f"plm.name_or_path: could not load a masked-LM model + tokenizer from {path} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        why = ("is not in the local Hugging Face cache and the machine is offline (HF_HUB_OFFLINE=1)"
               if local_only else f"could not be downloaded ({type(e).__name__})")
        raise XmxError(f"plm.name_or_path: {name_or_path} {why}; {hint}") from None
    return model, tok, src


class PLM(nn.Module):
    """A masked-LM transformer (``model``: ``*ForMaskedLM``) with its tokenizer; frozen and in eval mode by default.

    ``model.base_model`` gives hidden states (GLUE heads); ``model(...)`` gives MLM logits ``[B,L,V]``.
    """

    def __init__(self, model: nn.Module, tokenizer, kind: str, name: str, source: str, random_init: bool,
                 freeze: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.name = name
        self.source = source
        self.random_init = random_init
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
        self.model.train(not freeze)
        # every layer list the X-adapter hooks into: model.base_model.encoder.layer (BERT and RoBERTa alike)
        try:
            self.layers = self.model.base_model.encoder.layer
        except AttributeError:
            raise XmxError(f"plm.name_or_path: {name} has no base_model.encoder.layer list; only BERT-style encoders "
                           f"({', '.join(KINDS)}) are supported") from None

    def train(self, mode: bool = True):  # a frozen PLM stays in eval mode (no dropout)
        return super().train(mode and not self.frozen)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def mask_token(self) -> str:
        return self.tokenizer.mask_token

    @property
    def mask_token_id(self) -> int:
        return int(self.tokenizer.mask_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts, text_pairs=None, max_length: int = 128) -> dict[str, torch.Tensor]:
        """texts (and optional second segments) -> {"input_ids" [B,L], "attention_mask" [B,L], ...}, padded to the
        longest in the batch and truncated to ``max_length``."""
        return self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, padding=True,
                              truncation=True, max_length=max_length, return_tensors="pt")

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "random_init": self.random_init,
                "frozen": self.frozen, "hidden_size": self.hidden_size, "layers": self.num_layers,
                "vocab_size": len(self.tokenizer)}


def build_plm(name_or_path: str, kind: Literal["auto", "bert", "roberta"] = "auto", freeze: bool = True,
              cache_dir: str | None = None, tiny_hidden: PosInt = 64, tiny_layers: PosInt = 3, tiny_heads: PosInt = 4,
              seed: NonNegInt = 0) -> PLM:
    """Build a frozen PLM. ``name_or_path``: a hub name (``bert-base-uncased``, ``roberta-base``), a local folder,
    or ``tiny`` (random init; ``kind`` picks BERT or RoBERTa, default BERT). ``kind="auto"`` takes the model's type
    from its config; anything but BERT/RoBERTa is refused."""
    if kind not in ("auto",) + KINDS:
        raise XmxError(f"plm.kind: unknown kind {kind!r}; valid: auto, {', '.join(KINDS)}")
    if str(name_or_path) == "tiny":
        k = "bert" if kind == "auto" else kind
        model, tok = build_tiny_plm(k, tiny_hidden, tiny_layers, tiny_heads, seed)
        return PLM(model, tok, k, f"tiny-{k}", "random-init", True, freeze)
    model, tok, src = _load_pretrained(str(name_or_path), cache_dir)
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in KINDS:
        raise XmxError(f"plm.name_or_path: {name_or_path} is a {mtype!r} model; supported: {', '.join(KINDS)}")
    if kind != "auto" and kind != mtype:
        raise XmxError(f"plm.kind: {kind} was asked for but {name_or_path} is a {mtype} model; set plm.kind=auto")
    if tok.mask_token is None:
        raise XmxError(f"plm.name_or_path: the tokenizer of {name_or_path} has no mask token; a masked-LM tokenizer "
                       "is needed")
    return PLM(model, tok, mtype, str(name_or_path), src, False, freeze)
