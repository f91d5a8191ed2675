"""Tiny random-init transformers CLIP and SigLIP models written with save_pretrained (model, tokenizer, image
processor), for the hf_clip backbone tests: built offline in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a photo of the an image small large red green blue yellow purple circle square shape "
         "x y itap toy".split())


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(WORDS)) + list(".,"))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":  # CLIP: <bos> text <eos>
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 2), ("<eos>", 3)])
    else:  # SigLIP: text </s>
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def save_tiny(folder: Path, kind: str = "clip", seed: int = 0) -> Path:
    """Write a tiny ``CLIPModel`` (kind="clip") or ``SiglipModel`` (kind="siglip") folder and return it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel
    folder = Path(folder)
    tok = _tokenizer(kind)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "clip":
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
            proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        else:
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
            proc = SiglipImageProcessor(size={"height": 32, "width": 32})
            with torch.no_grad():  # a trained-looking scale and bias (random init has log 10 and -10)
                model.logit_scale.fill_(4.7)
                model.logit_bias.fill_(-12.9)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
