"""The retrieval index of CLIP image embeddings (X-adapter's V-expert, docs/methods/xadapter.md#design): cosine top-k
by chunked matmul over
the embeddings the feature store holds."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from xmx.errors import XmxError


class ImageIndex:
    """CLIP image embeddings [M,C] (stored L2-normalised) with ids; cosine top-k search by chunked matmul."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence, dtype: torch.dtype = torch.float32,
                 chunk: int = 65536):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise XmxError(f"image index: {tuple(embeddings.shape)} embeddings for {len(ids)} ids; expected [M,C] "
                           f"with one row per id")
        if embeddings.shape[0] == 0:
            raise XmxError("image index: no images; build it from the COCO train images")
        self.embeddings = F.normalize(embeddings.float(), dim=-1).to(dtype)  # [M,C]
        self.ids = list(ids)
        self.chunk = int(chunk)
        self._pos = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> "ImageIndex":
        self.embeddings = self.embeddings.to(device)
        return self

    def position(self, ids: Sequence) -> torch.Tensor:
        """Index rows of ``ids`` [N] (e.g. a caption's own image, to exclude or to use directly)."""
        if self._pos is None:
            self._pos = {x: i for i, x in enumerate(self.ids)}
        try:
            return torch.tensor([self._pos[x] for x in ids], dtype=torch.long)
        except KeyError as e:
            raise XmxError(f"image index: id {e.args[0]!r} is not in the index") from None

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 4, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q,C] (raw or normalised) -> (cosine scores [Q,k], index rows [Q,k]), best first; ``exclude``
        [Q] an index row to skip per query (-1: none)."""
        if not 1 <= k <= len(self):
            raise XmxError(f"image index: k={k} but the index holds {len(self)} images; use 1 <= k <= {len(self)}")
        q = F.normalize(queries.float(), dim=-1).to(self.embeddings.device, self.embeddings.dtype)  # [Q,C]
        ex = exclude.to(q.device) if exclude is not None else None
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for s in range(0, len(self), self.chunk):
            block = self.embeddings[s:s + self.chunk]  # [m,C]
            sc = (q @ block.T).float()  # [Q,m]
            if ex is not None:
                local = ex - s
                hit = (local >= 0) & (local < block.shape[0])
                sc[hit.nonzero().squeeze(1), local[hit]] = float("-inf")
            ts, ti = sc.topk(min(k, block.shape[0]), dim=1)
            best_s, order = torch.cat([best_s, ts], 1).topk(min(k, best_s.shape[1] + ts.shape[1]), dim=1)
            best_i = torch.cat([best_i, ti + s], 1).gather(1, order)
        return best_s, best_i

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """index rows [Q,k] -> normalised embeddings [Q,k,C]."""
        return self.embeddings[rows.to(self.embeddings.device)]
