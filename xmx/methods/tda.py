"""TDA, the training-free dynamic adapter (Karmanov et al., CVPR'24; release kdiAAA/TDA), on cached features.

Every test image ``i`` of the stream (``protocol=test_time``: an order drawn from the seed) has V views (1, or the
centre crop + 63 AugMix views on ImageNet-A/-V2/-R/-S), normalised features ``f_iv`` and zero-shot logits
``z_iv = 100 f_iv W`` (W: the release's prompt ensemble per dataset). With more than one view the ``k = int(0.1 V)``
views of lowest entropy ``H(softmax z_iv)`` are kept (set ``S_i``), else ``S_i = {0}``:

    x_i = mean_{v in S_i} f_iv            (the cache key: the mean of unit vectors, not renormalised, as the release)
    z_i = mean_{v in S_i} z_iv            p_i = mean_{v in S_i} softmax(z_iv)          y_i = argmax z_i
    h_i = H(p_i) (nats; for one view H(softmax z_i))                 e_i = h_i / log2(K)   (the release's normalisation)

Two caches map a class to at most ``shot_capacity`` entries sorted by h (stable), each updated *before* image i is
scored (the release's order, so an image can see itself):

    positive: (x_i, h_i) under y_i                      value: onehot(y_i)
    negative: (x_i, h_i, p_i) under y_i, only if lower < e_i < upper      value: 1[mask_lower < p_i < mask_upper]
    update: a class with room appends; a full one replaces its last (largest h) entry when h_i is smaller; then sorts.

    logits_i = z_i + alpha+ sum_{e in pos} exp(-beta+ (1 - x_i . x_e)) v_e - alpha- sum_{e in neg} exp(-beta- (1 - x_i . x_e)) v_e

Nothing in the cache decisions depends on the cache logits, so the per-image bookkeeping (which entry enters, which
it evicts) runs first on plain numbers; every entry then has a lifetime ``[t_in, t_out)`` and the logits of a chunk
of images are one masked matrix product against the entries alive during the chunk (:func:`tda_stream`). The
results equal the release's per-image loop (tests/test_tda.py replays it) up to floating-point summation order.
docs/methods/test_time.md#tda; the recipe: xmx/recipes/tda.yaml.

Long file: the release's stream loop, its replay-exact vectorised form, the checkpointed stream state and the
rebuilding of a trained base method (``init_from``) belong to one test-time method; split them and each half
reads only with the other open.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from xmx.errors import XmxError
from xmx.methods.base import XmxModule, fit_device

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ---- per-view summary (vectorised over the whole stream) -------------------------------------------------------
def softmax_entropy(z: torch.Tensor) -> torch.Tensor:
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def avg_entropy(z: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Entropy of the mean of ``softmax(z)`` over ``dim`` (the release's logsumexp form)."""
    lp = z - z.logsumexp(dim=-1, keepdim=True)
    avg = lp.logsumexp(dim=dim) - math.log(z.shape[dim])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


def selected_views(n_views: int, top: float) -> int:
    k = int(n_views * top) if n_views > 1 else 1
    if k < 1:
        raise XmxError(f"method.views={n_views} keeps int({n_views} x {top}) = 0 confident views; use at least "
                       f"{math.ceil(1 / top)} views (the release: 64) or 1")
    return k


@dataclass
class Summary:
    """What the stream loop needs of every image: key [N,C], zero-shot logits [N,K], entropy [N], probs [N,K],
    pseudo-label [N]."""
    key: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor
    prob: torch.Tensor
    pred: torch.Tensor


def summarize_views(feats: torch.Tensor, W: torch.Tensor | None, scale: float = 100.0, top: float = 0.1,
                    chunk: int = 1024, score=None, device: torch.device | None = None) -> Summary:
    """feats [V,N,C] raw features (view 0 first), W [C,K] normalised class embeddings -> :class:`Summary`.
    ``score``: a trained base method's classifier instead of ``scale * f W`` (normalised features [M,C] -> logits
    [M,K]; docs/methods/test_time.md#composing-with-a-trained-method); the keys stay the features."""
    V, N, _ = feats.shape
    k = selected_views(V, top)
    dev = W.device if W is not None else (device or feats.device)
    out = {n: [] for n in ("key", "logits", "loss", "prob", "pred")}
    for a in range(0, N, chunk):
        f = F.normalize(feats[:, a:a + chunk].to(dev, torch.float32), dim=-1)  # [V,B,C]
        if score is None:
            z = scale * f @ W  # [V,B,K]
        else:
            z = score(f.reshape(-1, f.shape[-1])).float().reshape(f.shape[0], f.shape[1], -1)
        if V == 1:
            key, zi, loss, prob = f[0], z[0], softmax_entropy(z[0]), z[0].softmax(-1)
        else:
            idx = torch.argsort(softmax_entropy(z), dim=0, stable=True)[:k]  # [k,B] lowest entropy first
            sel = torch.gather(z, 0, idx[..., None].expand(-1, -1, z.shape[-1]))  # [k,B,K]
            key = torch.gather(f, 0, idx[..., None].expand(-1, -1, f.shape[-1])).mean(0)
            zi, loss, prob = sel.mean(0), avg_entropy(sel, 0), sel.softmax(-1).mean(0)
        for n, v in zip(out, (key, zi, loss, prob, zi.argmax(-1))):
            out[n].append(v)
    return Summary(*(torch.cat(v) for v in out.values()))


# ---- the caches: bookkeeping on plain numbers ------------------------------------------------------------------
@dataclass
class CacheBook:
    """One cache (positive or negative): per class the entries sorted by entropy, and every entry's lifetime."""
    capacity: int
    slots: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # class -> [(loss, entry id)] sorted
    t_in: list[int] = field(default_factory=list)  # entry id -> the image that entered it (= its image index)
    t_out: list[int] = field(default_factory=list)  # entry id -> the first image that no longer sees it
    cls: list[int] = field(default_factory=list)

    def update(self, c: int, loss: float, i: int) -> None:
        """The release's ``update_cache``: append while there is room, else replace the last entry when ``loss`` is
        smaller; then a stable sort by loss (a new entry goes after the entries of equal loss)."""
        entries = self.slots.get(c)
        if entries is None:
            self.slots[c] = [(loss, self._new(c, i))]
            return
        if len(entries) >= self.capacity:
            if not loss < entries[-1][0]:
                return
            self.t_out[entries.pop()[1]] = i
        pos = bisect.bisect_right([e[0] for e in entries], loss)
        entries.insert(pos, (loss, self._new(c, i)))

    def _new(self, c: int, i: int) -> int:
        self.t_in.append(i)
        self.t_out.append(1 << 62)
        self.cls.append(c)
        return len(self.t_in) - 1

    def contents(self) -> dict[int, list[int]]:
        """class -> the image indices of its entries, in cache order (the release's ``cache[c]``)."""
        return {c: [self.t_in[e] for _, e in v] for c, v in sorted(self.slots.items())}

    def state(self) -> dict:
        return {"capacity": self.capacity, "slots": {int(c): [[float(l), int(e)] for l, e in v]
                                                      for c, v in self.slots.items()},
                "t_in": list(self.t_in), "t_out": list(self.t_out), "cls": list(self.cls)}

    @classmethod
    def from_state(cls, s: dict) -> "CacheBook":
        return cls(int(s["capacity"]), {int(c): [(float(l), int(e)) for l, e in v] for c, v in s["slots"].items()},
                   list(s["t_in"]), list(s["t_out"]), list(s["cls"]))


@dataclass(frozen=True)
class TDAConfig:
    pos_enabled: bool = True
    pos_capacity: int = 3
    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    neg_enabled: bool = True
    neg_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    entropy_lower: float = 0.2
    entropy_upper: float = 0.5
    mask_lower: float = 0.03
    mask_upper: float = 1.0

    @classmethod
    def from_table(cls, row: dict) -> "TDAConfig":
        pos, neg = row.get("positive", {}), row.get("negative", {})
        ent, mask = neg.get("entropy_threshold", {}), neg.get("mask_threshold", {})
        cfg = cls(bool(pos.get("enabled", True)), int(pos.get("shot_capacity", 3)), float(pos.get("alpha", 2.0)),
                  float(pos.get("beta", 5.0)), bool(neg.get("enabled", True)), int(neg.get("shot_capacity", 2)),
                  float(neg.get("alpha", 0.117)), float(neg.get("beta", 1.0)), float(ent.get("lower", 0.2)),
                  float(ent.get("upper", 0.5)), float(mask.get("lower", 0.03)), float(mask.get("upper", 1.0)))
        for key, v in (("positive.shot_capacity", cfg.pos_capacity), ("negative.shot_capacity", cfg.neg_capacity)):
            if v < 1:
                raise XmxError(f"method TDA {key}={v} must be >= 1 (the release: 3 positive, 2 negative)")
        for key, v in (("positive.beta", cfg.pos_beta), ("negative.beta", cfg.neg_beta)):
            if not v >= 0:
                raise XmxError(f"method TDA {key}={v} must be >= 0 (a sharpness; the release uses 1-8)")
        if not cfg.entropy_lower < cfg.entropy_upper or not cfg.mask_lower < cfg.mask_upper:
            raise XmxError("method TDA negative.entropy_threshold / mask_threshold: lower must be below upper "
                           f"(got {cfg.entropy_lower}..{cfg.entropy_upper}, {cfg.mask_lower}..{cfg.mask_upper})")
        return cfg


class TDAStream:
    """The stream state of one split: both caches' bookkeeping, the position reached and the logits so far."""

    def __init__(self, s: Summary, cfg: TDAConfig):
        self.s, self.cfg = s, cfg
        self.n, self.K = s.logits.shape
        self.pos, self.neg = CacheBook(cfg.pos_capacity), CacheBook(cfg.neg_capacity)
        self.done = 0
        self.parts: list[torch.Tensor] = []  # logits [chunk,K] of the images processed, on the CPU
        # everything the decisions read, as plain numbers once (the loop below never waits on a device)
        self._pred = s.pred.cpu().tolist()
        self._loss = s.loss.float().cpu().tolist()
        self._ent = (s.loss.float().cpu() / math.log2(self.K)).tolist()  # release: float(loss / log2(K))

    # -- bookkeeping for images [a, b)
    def _book(self, a: int, b: int) -> None:
        c = self.cfg
        for i in range(a, b):
            y, h = self._pred[i], self._loss[i]
            if c.pos_enabled:
                self.pos.update(y, h, i)
            if c.neg_enabled and c.entropy_lower < self._ent[i] < c.entropy_upper:
                self.neg.update(y, h, i)

    def _cache_logits(self, book: CacheBook, a: int, b: int, beta: float, negative: bool) -> torch.Tensor | None:
        t_in = torch.tensor(book.t_in, dtype=torch.long)
        t_out = torch.tensor(book.t_out, dtype=torch.long)
        live = ((t_in < b) & (t_out > a)).nonzero().flatten()  # entries alive at some image of the chunk
        if not len(live):
            return None
        dev = self.s.key.device
        rows = torch.arange(a, b)
        seen = (t_in[live][None] <= rows[:, None]) & (rows[:, None] < t_out[live][None])  # [B,E]
        img = t_in[live].to(dev)  # an entry's key/value are its image's
        aff = self.s.key[a:b] @ self.s.key[img].T  # [B,E]
        A = torch.exp(-beta * (1 - aff)) * seen.to(dev, aff.dtype)
        if negative:
            p = self.s.prob[img]
            values = ((p > self.cfg.mask_lower) & (p < self.cfg.mask_upper)).to(A.dtype)  # [E,K]
            return A @ values
        return torch.zeros(b - a, self.K, device=dev, dtype=A.dtype).index_add_(
            1, torch.tensor(book.cls, dtype=torch.long)[live].to(dev), A)

    def run(self, until: int | None = None, chunk: int = 1024, on_chunk=None) -> None:
        """Process images ``done .. until`` (all by default), ``chunk`` at a time; ``on_chunk(self)`` after each."""
        end = self.n if until is None else min(int(until), self.n)
        c = self.cfg
        while self.done < end:
            a, b = self.done, min(self.done + chunk, end)
            self._book(a, b)
            z = self.s.logits[a:b].clone()
            if c.pos_enabled:
                pl = self._cache_logits(self.pos, a, b, c.pos_beta, False)
                if pl is not None:
                    z += c.pos_alpha * pl
            if c.neg_enabled:
                nl = self._cache_logits(self.neg, a, b, c.neg_beta, True)
                if nl is not None:
                    z -= c.neg_alpha * nl
            self.parts.append(z.cpu())
            self.done = b
            if on_chunk is not None:
                on_chunk(self)

    @property
    def logits(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, self.K)

    def state(self) -> dict:
        return {"done": self.done, "logits": self.logits, "pos": self.pos.state(), "neg": self.neg.state()}

    def load(self, st: dict) -> None:
        self.done = int(st["done"])
        self.parts = [st["logits"].float()] if self.done else []
        self.pos, self.neg = CacheBook.from_state(st["pos"]), CacheBook.from_state(st["neg"])


def tda_stream(s: Summary, cfg: TDAConfig, chunk: int = 1024) -> TDAStream:
    st = TDAStream(s, cfg)
    st.run(chunk=chunk)
    return st


def summary_digest(s: Summary, cfg: TDAConfig, order: list[int] | None) -> str:
    """Identifies a stream (its inputs, settings and order): a resumed state is only taken for the same one."""
    h = hashlib.sha256(repr((cfg, order)).encode())
    for t in (s.key, s.logits):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- composing with a trained base method (init_from) ----------------------------------------------------------
# The bases whose logits are a function of one image's frozen features (their class text features are fixed once
# trained): their classifier replaces the zero-shot ``z``; the cache keys stay the frozen features.
BASES = {"xmx.methods.coop.CoOpMethod": "coop", "xmx.methods.coop.KgCoOpMethod": "kgcoop"}
NOT_BASES = {  # why a trained method is no base (yet): checked by class, before any data is read
    "xmx.methods.tip_adapter.TipAdapterMethod": "not built yet (its cache over training features is not rebuilt "
                                                "under protocol=test_time)",
    "xmx.methods.tip_adapter.TipAdapterFMethod": "not built yet (its cache over training features is not rebuilt "
                                                 "under protocol=test_time)",
    "xmx.methods.coop.CoCoOpMethod": "not meaningful (instance-conditioned prompts: no fixed classifier)",
    "xmx.methods.coop.TPTMethod": "not meaningful (another test-time method)",
}
NOT_FAMILIES = {"tda": "not meaningful (another test-time method)",
                "xadapter": "not meaningful (a language-track method: no image classifier)"}
SUPPORTED = "CoOp, KgCoOp (zero-shot CLIP: leave init_from unset)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _why_not(klass: str, family: str) -> str:
    if klass in NOT_BASES:
        return NOT_BASES[klass]
    if family in NOT_FAMILIES:
        return NOT_FAMILIES[family]
    try:
        from hydra.utils import get_class

        from xmx.methods._training import EncoderMethod
        if issubclass(get_class(klass), EncoderMethod):
            return ("not built yet (its adapted image encoder would have to re-encode every streamed view; the "
                    "feature store holds the frozen encoder's)")
    except Exception:  # noqa: BLE001 - an unknown or unrecorded class: the generic reason
        pass
    return "not built yet (only the prompt learners' classifier is rebuilt under protocol=test_time so far)"


def check_base(path) -> dict:
    """``init_from`` of a TDA run: the checkpoint of a supported base method (by its recorded class) in a finished
    run folder (its ``results.json`` holds the method config the base is rebuilt from). Anything else is one line."""
    from xmx.methods.base import read_checkpoint
    ckpt, raw = read_checkpoint(path)
    meta = raw.get("xmx_method") or {}
    klass = str(meta.get("class") or "")
    if klass not in BASES:
        what = f"{meta.get('name') or 'an unnamed method'} ({klass or (meta.get('family') or '?') + ' family'})"
        why = _why_not(klass, str(meta.get("family") or ""))
        raise XmxError(f"init_from={path}: TDA on top of {what} is {why}; TDA composes on: {SUPPORTED} "
                       "(docs/methods/test_time.md#composing-with-a-trained-method)")
    folder = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    res = folder / "results.json"
    try:
        rec = json.loads(res.read_text())
        mcfg = rec["config"]["method"]
        assert isinstance(mcfg, dict) and "_target_" in mcfg
    except Exception:  # noqa: BLE001 - missing, unfinished or foreign: one line
        raise XmxError(f"init_from={path}: {res} is missing or holds no method config: TDA rebuilds the base method "
                       "from its run; pass the folder of a finished xmx run") from None
    return {"checkpoint": ckpt, "run": folder, "class": klass, "method": meta.get("name"), "method_cfg": mcfg,
            "base": BASES[klass], "weights": rec.get("weights") or {},
            "backbone_cfg": rec["config"].get("backbone") or {}}


def check_same_backbone(info: dict, backbone_cfg) -> None:
    """The base was trained on this run's backbone (a context of another text tower may have the same shape)."""
    for k in ("model", "weights"):
        theirs, mine = info["backbone_cfg"].get(k), (backbone_cfg or {}).get(k)
        if k in info["backbone_cfg"] and mine is not None and str(mine) != str(theirs):
            raise XmxError(f"init_from={info['run']}: the base run's backbone.{k} is {theirs!r}, this run's is "
                           f"{mine!r}; run TDA with the backbone the base was trained with")


def rebuild_base(info: dict, dm, dev: torch.device):
    """The base method of :func:`check_base`, built on this run's datamodule (every eval set gets its classifier) and
    loaded from its checkpoint; kept out of TDA's own modules (and checkpoints)."""
    from omegaconf import OmegaConf

    from xmx.config import build
    mine, theirs = (dm.backbone.describe() if hasattr(dm.backbone, "describe") else {}), info["weights"]
    for k in ("name", "arch", "sha256"):  # a context of another text tower may have the same shape: refuse by name
        if k in mine and k in theirs and mine[k] != theirs[k]:
            raise XmxError(f"init_from={info['run']}: the base run's backbone {k} is {theirs[k]!r}, this run's is "
                           f"{mine[k]!r}; run TDA with the backbone the base was trained with")
    base = build(OmegaConf.create(info["method_cfg"]), _convert_="partial")
    base.dm = dm
    base.build(dm)
    base.load_weights(info["checkpoint"])
    return base.eval().to(dev)


# ---- the LightningModule ---------------------------------------------------------------------------------------
class TDA(XmxModule):
    """``protocol=test_time`` only: each eval set is a stream; ``build`` runs every stream (checkpointed every
    ``checkpoint_every`` images into ``checkpoints/last.ckpt``: a killed run resumes mid-stream), and ``logits``
    hands out the rows in the stream's order."""
    needs_fit = False

    def __init__(self, datasets: dict | None = None, default: dict | None = None, views: int | None = None,
                 view_preset: str = "augmix", top: float = 0.1, logit_scale: float = 100.0,
                 dataset_templates: dict | None = None, device: str = "auto", chunk: int = 1024,
                 checkpoint_every: int = 5000, protocol: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if protocol is not None and protocol != "test_time":
            raise XmxError(f"method={kwargs.get('name') or 'tda'} runs on protocol=test_time (the test set as a "
                           f"stream); got protocol={protocol}")
        self.table, self.default = dict(datasets or {}), dict(default or {})
        self.views_override, self.view_preset, self.top = views, view_preset, float(top)
        self.scale, self.templates_table = float(logit_scale), dict(dataset_templates or {})
        self.device_choice, self.chunk, self.checkpoint_every = device, int(chunk), int(checkpoint_every)
        if self.chunk < 1 or self.checkpoint_every < 0:
            raise XmxError(f"method.chunk={chunk} must be >= 1 and method.checkpoint_every={checkpoint_every} >= 0 "
                           "(0: no mid-stream checkpoints)")
        if not 0 < self.top <= 1:
            raise XmxError(f"method.top={top}: the share of confident views kept must lie in (0, 1] (release: 0.1)")
        for ds in {None, *self.table}:  # every row, before any image is read
            TDAConfig.from_table(self.row(ds))
            self.n_views(ds)
        self.streams: dict[str, TDAStream] = {}
        self.settings: dict[str, dict] = {}
        self._cursor: dict[str, int] = {}
        self._digests: dict[str, str] = {}

    def row(self, dataset: str | None) -> dict:
        """The dataset's row over ``default`` (nested keys merged)."""
        def merge(a: dict, b: dict) -> dict:
            return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                            for k, v in b.items()}}
        return merge(self.default, self.table.get(dataset, {}) if dataset else {})

    def n_views(self, dataset: str | None) -> int:
        v = self.views_override if self.views_override is not None else self.row(dataset).get("views", 1)
        if not isinstance(v, int) or v < 1:
            raise XmxError(f"method.views={v!r} must be a positive integer (1: the centre crop; release: 64 on "
                           "ImageNet-A/-V2/-R/-S)")
        selected_views(v, self.top)
        return v

    def _checkpoint_path(self) -> Path | None:
        trainer = getattr(self, "_trainer", None)
        root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
        return Path(root) / "checkpoints" / "last.ckpt" if root else None

    def build(self, dm) -> None:
        if dm.protocol.name != "test_time":
            raise XmxError(f"method=tda runs on protocol=test_time (the test set as a stream); got "
                           f"protocol={dm.protocol.name}")
        from xmx.data.templates import resolve_templates
        dev = fit_device(self.device_choice)
        base = None
        if self.init_from:  # a trained base method's classifier instead of the zero-shot one
            info = check_base(self.init_from)
            base = rebuild_base(info, dm, dev)
            self.init_record = {"checkpoint": str(info["checkpoint"]), "method": info["method"],
                                "run": str(info["run"]), "class": info["class"],
                                "sha256": _sha256(info["checkpoint"]),
                                "label": f"{self.method_name or 'tda'} on {info['base']}",
                                "loaded": (base.init_record or {}).get("loaded"),
                                "not_in_checkpoint": (base.init_record or {}).get("not_in_checkpoint")}
        plans = []
        for s in dm.eval_sets:
            cfg = TDAConfig.from_table(self.row(s.dataset))
            V = self.n_views(s.dataset)
            feats = dm.features_of(s)[None]
            if V > 1:
                feats = torch.cat([feats, dm.view_features_of(s, self.view_preset, V - 1)])
            if base is None:
                templates = resolve_templates(self.templates_table.get(s.dataset), s.templates)
                W = dm.text_classifier(s.classnames, templates).to(dev)
                summ = summarize_views(feats, W, self.scale, self.top, self.chunk)
                classifier = {"classifier": "zero-shot", "templates": len(templates)}
            else:
                def score(f, s=s):
                    with torch.no_grad():
                        return base.logits(f, s)
                summ = summarize_views(feats, None, self.scale, self.top, self.chunk, score=score, device=dev)
                classifier = {"classifier": self.init_record["label"].split(" on ", 1)[1]}
            plans.append((s, summ, cfg))
            self.settings[s.name] = {"dataset": s.dataset, "views": V, "view_preset": self.view_preset if V > 1
                                     else "none", **classifier, **cfg.__dict__}
        path = self._checkpoint_path()
        saved = self._read_state(path)
        for s, summ, cfg in plans:
            st = TDAStream(summ, cfg)
            digest = summary_digest(summ, cfg, s.order)
            if s.name in saved and saved[s.name]["digest"] == digest:
                st.load(saved[s.name])
                log.warning("TDA %s: resuming the stream at image %d of %d (%s)", s.name, st.done, st.n, path)
            self.streams[s.name], self._digests[s.name] = st, digest
            every, last = self.checkpoint_every, [st.done]

            def save(stream, last=last):
                if path is not None and every and (stream.done - last[0] >= every or stream.done == stream.n):
                    last[0] = stream.done
                    self._write_state(path)
            st.run(chunk=self.chunk, on_chunk=save)

    @classmethod
    def check_init_from(cls, path, cfg=None) -> None:
        """Preflight's ``init_from`` check for TDA: a supported base method's run (:func:`check_base`) on this run's
        backbone."""
        info = check_base(path)
        if cfg is not None and cfg.get("backbone") is not None:
            check_same_backbone(info, cfg.backbone)

    def load_weights(self, path) -> None:
        """TDA holds no weights: ``init_from`` names the base method, loaded in :meth:`build`."""

    # -- mid-stream checkpoints
    def _read_state(self, path: Path | None) -> dict:
        if path is None or not path.is_file():
            return {}
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a truncated file is not resumed from
            return {}
        st = raw.get("xmx_stream") or {}
        return st.get("streams", {}) if st.get("version") == STATE_VERSION else {}

    def _write_state(self, path: Path) -> None:
        """Every stream reached so far (finished ones and the one running), written atomically."""
        streams = {n: {**st.state(), "digest": self._digests[n]} for n, st in self.streams.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": {}, "xmx_method": {"name": self.method_name, "family": "tda"},
                    "xmx_stream": {"version": STATE_VERSION, "streams": streams}}, tmp)
        tmp.replace(path)

    # -- evaluation: the stream's rows in order
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._cursor = {}

    def logits(self, x, eval_set):
        st = self.streams[eval_set.name]
        a = self._cursor.get(eval_set.name, 0)
        self._cursor[eval_set.name] = a + len(x)
        return st.logits[a:a + len(x)].to(x.device)

    def extra_results(self) -> dict:
        return {"streams": {n: {**self.settings[n], "images": st.n,
                                "positive_entries": sum(map(len, st.pos.slots.values())),
                                "negative_entries": sum(map(len, st.neg.slots.values()))}
                            for n, st in self.streams.items()}}
