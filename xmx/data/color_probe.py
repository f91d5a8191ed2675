"""The zero-shot object-colour probe (MemoryColor / ColorTerms, docs/methods/xadapter.md#design): the 9 VaLM
templates, the colour words'
token ids, prompts with one mask token, and pooled / per-template accuracy from MLM logits at the mask."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from xmx.errors import XmxError


VALM_TEMPLATES = (
    "Q: What is the color of [D] [I]? A: It is",
    "What is the color of [D] [I]? It is",
    "What is the usual color of [D] [I]?",
    "What is the typical color of [D] [I]?",
    "The color of [D] [I] is",
    "The usual color of [D] [I] is",
    "The common color of [D] [I] is",
    "The typical color of [D] [I] is",
    "[D] [I] usually has the color of",
)


def fill_template(template: str, descriptor: str, item: str, mask_token: str) -> str:
    """``[D] [I]`` -> descriptor (stripped; dropped when empty) and item, then `` <mask>.``"""
    d = descriptor.strip()
    text = template.replace("[D] [I]", f"{d} {item}" if d else item)
    return f"{text} {mask_token}."


def color_token_ids(tokenizer, colors: Sequence[str]) -> torch.Tensor:
    """The single token id of each colour word as it follows a space ([n_colors]); XmxError names a word that is
    not one token (e.g. ``gray`` vs ``grey``, or a missing RoBERTa ``Ġword`` entry)."""
    out = []
    for c in colors:
        ids = tokenizer(" " + c, add_special_tokens=False)["input_ids"]  # BERT strips the space; RoBERTa keeps Ġ
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise XmxError(f"color probe: colour word {c!r} is not a single token for this tokenizer "
                           f"({pieces}); use a PLM whose vocabulary holds it or drop it from the colour set")
        out.append(ids[0])
    if len(set(out)) != len(out):
        raise XmxError(f"color probe: two colour words map to the same token: {list(colors)}")
    return torch.tensor(out, dtype=torch.long)


class ColorProbe:
    """The zero-shot colour probe: 9 templates × items prompts; the MLM logits at the mask, restricted to the
    dataset's colour words, pick the colour; accuracy is pooled over templates × items (percent)."""

    def __init__(self, dataset, tokenizer, templates: Sequence[str] = VALM_TEMPLATES, max_length: int = 64):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.color_ids = color_token_ids(tokenizer, dataset.colors)  # [n_colors]
        prompts = [(fill_template(t, it.descriptor, it.item, tokenizer.mask_token), dataset.label(it), ti)
                   for ti, t in enumerate(self.templates) for it in dataset.items]
        self.texts = [p[0] for p in prompts]
        self.labels = torch.tensor([p[1] for p in prompts])  # [N]
        self.template_of = torch.tensor([p[2] for p in prompts])  # [N]
        enc = tokenizer(self.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]  # [N,L]
        is_mask = self.input_ids == tokenizer.mask_token_id
        bad = (is_mask.sum(1) != 1).nonzero()
        if len(bad):
            raise XmxError(f"color probe: prompt {self.texts[int(bad[0])]!r} does not hold exactly one mask token "
                           f"after tokenization; raise max_length")
        self.mask_index = is_mask.float().argmax(1)  # [N]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int = 64) -> Iterator[dict]:
        """Dicts with ``input_ids``/``attention_mask`` [B,L], ``mask_index`` [B], ``labels`` [B], ``hide`` [B,L]
        (the mask position, for :func:`plm_view_texts`), ``texts`` and ``rows`` (positions in the probe)."""
        for s in range(0, len(self), batch_size):
            sl = slice(s, s + batch_size)
            ids = self.input_ids[sl]
            yield {"input_ids": ids, "attention_mask": self.attention_mask[sl], "mask_index": self.mask_index[sl],
                   "labels": self.labels[sl], "hide": ids == self.tokenizer.mask_token_id,
                   "texts": self.texts[sl], "rows": torch.arange(s, s + ids.shape[0])}

    def restrict(self, mlm_logits: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """MLM logits [B,L,V] -> logits over the colour words at the mask [B,n_colors]."""
        at_mask = mlm_logits[torch.arange(mlm_logits.shape[0], device=mlm_logits.device),
                             mask_index.to(mlm_logits.device)]  # [B,V]
        return at_mask[:, self.color_ids.to(at_mask.device)]

    def score(self, color_logits: torch.Tensor) -> dict[str, float]:
        """colour logits [N,n_colors] in probe order -> {"acc": pooled %, "acc/t<i>": per-template %}."""
        if color_logits.shape[0] != len(self):
            raise XmxError(f"color probe: {color_logits.shape[0]} predictions for {len(self)} prompts")
        correct = (color_logits.argmax(1).cpu() == self.labels).float()
        out = {"acc": 100.0 * float(correct.mean())}
        for ti in range(len(self.templates)):
            out[f"acc/t{ti}"] = 100.0 * float(correct[self.template_of == ti].mean())
        return out

    @torch.no_grad()
    def evaluate(self, predict: Callable[[dict], torch.Tensor], batch_size: int = 64) -> dict[str, float]:
        """``predict(batch) -> MLM logits [B,L,V]`` (set the adapter context inside it) -> :meth:`score`."""
        return self.score(torch.cat([self.restrict(predict(b), b["mask_index"]).float().cpu()
                                     for b in self.batches(batch_size)]))
