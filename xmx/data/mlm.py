"""MLM masking for the language track (docs/methods/xadapter.md#design): BERT-style masking of PLM token ids, and the
sentences as the PLM
sees them (with the MLM targets hidden) for CLIP's tokenizer. Tokenizer-level text processing, used by the text
DataModules and the X-adapter runs alike."""

from __future__ import annotations

import torch

from xmx.errors import XmxError


class MLMMasker:
    """BERT masking: each maskable token (not special, not padding) is selected with probability ``ratio``;
    a selected token becomes the mask token with p ``mask_prob`` (0.8), a random non-special token with p
    ``random_prob`` (0.1), and stays as it is otherwise. Seeded, independent of global random state."""

    def __init__(self, tokenizer, ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1,
                 seed: int = 0):
        if not 0.0 < ratio < 1.0:
            raise XmxError(f"data.mask_ratio={ratio}: must be in (0, 1)")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise XmxError(f"data.mask_prob={mask_prob}, data.random_prob={random_prob}: each and their sum must lie "
                           "in [0, 1]")
        if tokenizer.mask_token_id is None:
            raise XmxError("MLM masking: the tokenizer has no mask token")
        self.ratio, self.mask_prob, self.random_prob = ratio, mask_prob, random_prob
        self.mask_id = int(tokenizer.mask_token_id)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        self.candidates = vocab[~torch.isin(vocab, self.special)]  # random replacements: never a special token
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,L] -> (masked input_ids [B,L], labels [B,L]: the original id where predicted, else -100)."""
        ids = input_ids.detach().cpu()
        maskable = ~torch.isin(ids, self.special)
        if attention_mask is not None:
            maskable &= attention_mask.detach().cpu().bool()
        g = self.generator
        selected = (torch.rand(ids.shape, generator=g) < self.ratio) & maskable
        u = torch.rand(ids.shape, generator=g)
        to_mask = selected & (u < self.mask_prob)
        to_random = selected & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
        rand_ids = self.candidates[torch.randint(len(self.candidates), ids.shape, generator=g)]
        out = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out = torch.where(to_random, rand_ids, out)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        return out.to(input_ids.device), labels.to(input_ids.device)


def plm_view_texts(tokenizer, input_ids: torch.Tensor, hide: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, mode: str = "mask_word",
                   mask_word: str | None = None) -> list[str]:
    """The sentences as the PLM sees them, for CLIP (V-expert retrieval query, T-expert features), with every
    position in ``hide`` [B,L] (the MLM targets, including the 10 % kept / random ones) replaced by ``mask_word``
    (default: the tokenizer's mask token) or removed (``mode="remove"``), so the answer cannot leak through CLIP."""
    if mode not in ("mask_word", "remove"):
        raise XmxError(f"data.query_masked: unknown mode {mode!r}; valid: mask_word, remove")
    ids = input_ids.detach().cpu().clone()
    mask_id = int(tokenizer.mask_token_id)
    if hide is not None:
        ids[hide.detach().cpu().bool()] = mask_id
    drop = set(tokenizer.all_special_ids) - {mask_id}
    word = tokenizer.mask_token if mask_word is None else mask_word
    am = attention_mask.detach().cpu().bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    out = []
    for row, keep in zip(ids.tolist(), am.tolist()):
        toks = [t for t, k in zip(row, keep) if k and t not in drop and not (mode == "remove" and t == mask_id)]
        pieces, run = [], []
        for t in toks:  # decode runs of ordinary tokens; each mask token becomes one mask word
            if t == mask_id:
                if run:
                    pieces.append(tokenizer.decode(run).strip())
                    run = []
                pieces.append(word)
            else:
                run.append(t)
        if run:
            pieces.append(tokenizer.decode(run).strip())
        out.append(tokenizer.clean_up_tokenization(" ".join(p for p in pieces if p)))  # "word ." -> "word."
    return out
