"""XMAdapter (Yang et al., arXiv 2404.12588) as reconstructed in docs/methods/xmadapter.md#reconstruction: a
Tip-Adapter-F image cache plus a text
cache whose keys are text-side features of the same training images, fused with a ratio gamma, and a loss that
up-weights the samples on which the two caches disagree. No code was published; every open choice is a constructor
argument (and a config key), and results are a reimplementation.

The equations (f = norm(raw image feature) [B, C], W [C, N], image keys F_img [NK, C] trainable, values L [NK, N])::

    g(x)    text-side feature of an image, [B, C]:
              text_mixture  g = norm(P(softmax(s f W) W^T))        (P = identity, or a Linear C->C init identity)
              linear        g = norm(Linear(f))                     (init identity)
              pseudo_token  g = norm(E_txt("a photo of a [Img2TxtNet(f)]." with context + MetaNet(f)))
    F_txt   = g(F_img)                                              # [NK, C], recomputed every step
    A_img   = exp(-beta     (1 - f    F_img^T))                     # [B, NK]
    A_txt   = exp(-beta_txt (1 - g(x) F_txt^T))                     # [B, NK]
    A       = gamma A_img + (1 - gamma) A_txt
    logits  = 100 f W + alpha A L                                   # [B, N]
    p_img   = softmax(tau A_img L / K),  p_txt = softmax(tau A_txt L / K)
    d_i     = 1/2 || p_img,i - p_txt,i ||_1  in [0, 1]
    loss    = mean_i (1 + d_i)^kappa CE_i                          (weights detached)

With ``gamma_mode="fixed"``, ``gamma=1`` and ``kappa=0`` this is exactly :class:`TipAdapterF`.

Below the equations: :class:`XMAdapterMethod`, the Lightning module (trained like Tip-Adapter-F; the search over
beta, beta_txt, alpha and gamma on validation before testing).

Long file: three image-to-text maps, the two-cache model, its four-way vectorised search and the module are one
family's equations; each part is short and refers to the ones above it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmx.errors import XmxError
from xmx.methods.base import chunk_rows
from xmx.methods.tip_adapter import (FULL_GRID_CELLS, ZS_SCALE, TipAdapterFMethod, affinity, check_cache, check_feats,
                                     correct_counts, grid_summary, norm, search_grid)

__all__ = ["IMG2TXT", "GAMMA_MODES", "TXT_KEYS_FROM", "Img2TxtNet", "MetaNet", "TextMixture", "LinearImg2Txt",
           "PseudoTokenImg2Txt", "make_pseudo_token_prompt", "hard_sample_weights", "XMAdapter", "XMSearchResult",
           "search_xmadapter", "search_beta_txt_separately", "BETA_TXT_SEARCH", "gamma_grid", "Branches",
           "TXT_KEYS_REFRESH", "XMAdapterMethod"]

IMG2TXT = ("text_mixture", "linear", "pseudo_token")
GAMMA_MODES = ("fixed", "searched", "learned")
TXT_KEYS_FROM = ("mean_view", "trained")
TXT_KEYS_REFRESH = ("step", "manual")

# encode_prompt(token [B, d_tok], ctx_shift [B, d_tok]) -> raw text features [B, C]
EncodePrompt = Callable[[Tensor, Tensor], Tensor]

log = logging.getLogger(__name__)


def _choice(what: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise XmxError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")
    return value


# ---- image -> text-side feature g --------------------------------------------------------------------------------
def _identity_linear(C: int, bias: bool) -> nn.Linear:
    lin = nn.Linear(C, C, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(C))
        if bias:
            lin.bias.zero_()
    return lin


class TextMixture(nn.Module):
    """``g = norm(P(softmax(s f W) W^T))``: the image re-expressed as a mixture of the class-text embeddings.
    ``s`` initial ``temp`` (trainable as ``log s`` when ``learn_temp``); ``P`` a Linear C->C initialised to the
    identity when ``proj``, else nothing."""

    def __init__(self, W: Tensor, temp: float = 100.0, learn_temp: bool = False, proj: bool = False,
                 bias: bool = False):
        super().__init__()
        self.register_buffer("W", W.detach().float().clone())                      # [C, N]
        log_s = torch.tensor(math.log(temp))
        self.log_temp = nn.Parameter(log_s) if learn_temp else None
        if not learn_temp:
            self.register_buffer("temp", torch.tensor(float(temp)))
        self.proj = _identity_linear(W.shape[0], bias) if proj else None

    def forward(self, f: Tensor) -> Tensor:
        """f [B, C] normalised -> g [B, C] normalised."""
        s = self.log_temp.exp() if self.log_temp is not None else self.temp
        t = torch.softmax(s * f @ self.W, dim=-1) @ self.W.T                     # [B, C]
        return norm(self.proj(t) if self.proj is not None else t)


class LinearImg2Txt(nn.Module):
    """``g = norm(Linear(f))``, initialised to the identity (then g(F_img) = F_img: the text branch starts as a copy
    of the image cache and the hard-sample weights are inert until it trains)."""

    def __init__(self, C: int, bias: bool = False):
        super().__init__()
        self.linear = _identity_linear(C, bias)

    def forward(self, f: Tensor) -> Tensor:
        return norm(self.linear(f))


class Img2TxtNet(nn.Module):
    """Image feature -> one pseudo word token: ``Linear(C -> d_tok)``."""

    def __init__(self, C: int, token_dim: int):
        super().__init__()
        self.net = nn.Linear(C, token_dim)

    def forward(self, f: Tensor) -> Tensor:  # [B, C] -> [B, d_tok]
        return self.net(f)


class MetaNet(nn.Module):
    """CoCoOp-style meta-net shifting the prompt's context tokens: ``Linear(C -> C/16) - ReLU - Linear(-> d_tok)``."""

    def __init__(self, C: int, token_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, C // 16)
        self.net = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, token_dim))

    def forward(self, f: Tensor) -> Tensor:  # [B, C] -> [B, d_tok]
        return self.net(f)


class PseudoTokenImg2Txt(nn.Module):
    """``g = norm(encode_prompt(Img2TxtNet(f), MetaNet(f)))``: the image becomes the pseudo word of the prompt
    "a photo of a [pseudo-token]." whose context tokens are shifted by MetaNet(f); ``encode_prompt`` runs the frozen
    text encoder (see :func:`make_pseudo_token_prompt`)."""

    def __init__(self, C: int, token_dim: int, encode_prompt: EncodePrompt, meta_hidden: int | None = None):
        super().__init__()
        self.img2txt = Img2TxtNet(C, token_dim)
        self.meta = MetaNet(C, token_dim, meta_hidden)
        self.encode_prompt = encode_prompt

    def forward(self, f: Tensor) -> Tensor:
        return norm(self.encode_prompt(self.img2txt(f), self.meta(f)).float())


def make_pseudo_token_prompt(backbone, template: str = "a photo of a {}.") -> tuple[EncodePrompt, int]:
    """An ``encode_prompt`` for :class:`PseudoTokenImg2Txt` from a :class:`xmx.backbones.CLIPBackbone`: the
    template's placeholder token is replaced by the pseudo token and the words before it (the context) are shifted
    by the meta-net output. Returns ``(encode_prompt, token_dim)``."""
    if "{}" not in template:
        raise XmxError(f"pseudo-token template {template!r} has no '{{}}' placeholder for the pseudo word")
    with torch.no_grad():
        a, b = backbone.tokenize([template.format("x"), template.format("y")])         # [L] each
    diff = (a != b).nonzero()
    if diff.numel() != 1:
        raise XmxError(f"pseudo-token template {template!r}: the placeholder must be a single token")
    pos = int(diff[0, 0])
    tokens = a[None]                                                                    # [1, L]

    def encode_prompt(token: Tensor, ctx_shift: Tensor) -> Tensor:
        B = token.shape[0]
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).expand(B, -1, -1)                   # [B, L, Wt]
        ctx = torch.zeros_like(emb)
        ctx[:, 1:pos] = ctx_shift[:, None].to(emb.dtype)                                # after SOT, before the word
        word = torch.zeros_like(emb)
        word[:, pos] = token.to(emb.dtype)
        keep = torch.ones(emb.shape[1], 1, device=emb.device, dtype=emb.dtype)
        keep[pos] = 0
        return backbone.encode_text_from_embeddings(emb * keep + ctx + word, tokens.expand(B, -1))

    return encode_prompt, int(backbone.text_width)


# ---- hard-sample weights -----------------------------------------------------------------------------------------
@torch.no_grad()
def hard_sample_weights(A_img: Tensor, A_txt: Tensor, values: Tensor, tau: float, shots: float,
                        kappa: float) -> tuple[Tensor, Tensor]:
    """``w_i = (1 + d_i)^kappa`` with ``d_i = 1/2 || softmax(tau A_img L / K) - softmax(tau A_txt L / K) ||_1``.

    A_img, A_txt [B, NK], values L [NK, N] -> (w [B] in [1, 2^kappa], d [B] in [0, 1]), both detached."""
    p_img = torch.softmax(tau * (A_img.detach() @ values) / shots, dim=-1)                # [B, N]
    p_txt = torch.softmax(tau * (A_txt.detach() @ values) / shots, dim=-1)                # [B, N]
    d = (0.5 * (p_img - p_txt).abs().sum(dim=-1)).clamp(0.0, 1.0)                        # [B]
    return (1.0 + d) ** kappa, d


class Branches(NamedTuple):
    zs: Tensor      # [B, N]  100 f W
    A_img: Tensor   # [B, NK]
    A_txt: Tensor   # [B, NK]
    logits: Tensor  # [B, N]


# ---- the model ---------------------------------------------------------------------------------------------------
class XMAdapter(nn.Module):
    """XMAdapter on frozen CLIP features. ``keys [NK, C]`` (normalised mean-view cache keys), ``values [NK, N]``,
    ``W [C, N]`` as for Tip-Adapter.

    Options (docs/methods/xmadapter.md#reconstruction): ``img2txt`` (text_mixture | linear | pseudo_token),
    ``img2txt_temp`` (s, 100),
    ``learn_img2txt_temp``, ``img2txt_proj`` (text_mixture only), ``img2txt_bias``; ``txt_keys_from``
    (``mean_view``: F_txt = g(the built cache keys); ``trained``: g(the current trained image keys));
    ``txt_keys_refresh`` (``step``: recomputed in every forward; ``manual``: cached, refreshed by
    :meth:`refresh_text_keys` — for pseudo_token, where encoding NK prompts per step is costly); ``alpha``, ``beta``,
    ``beta_txt`` (None = beta); ``gamma_mode`` (fixed | searched | learned) with ``gamma`` its value / value used
    while training / initial value; ``kappa`` (0 disables the hard-sample weights), ``tau``, ``shots`` (K; None = mean
    number of cached images per class); ``encode_prompt`` and ``token_dim`` for pseudo_token."""

    def __init__(self, keys: Tensor, values: Tensor, W: Tensor, *, alpha: float = 1.0, beta: float = 1.0,
                 beta_txt: float | None = None, gamma: float = 0.5, gamma_mode: str = "searched",
                 img2txt: str = "text_mixture", img2txt_temp: float = 100.0, learn_img2txt_temp: bool = False,
                 img2txt_proj: bool = False, img2txt_bias: bool = False, txt_keys_from: str = "mean_view",
                 txt_keys_refresh: str = "step", kappa: float = 1.0, tau: float = 50.0, shots: float | None = None,
                 encode_prompt: EncodePrompt | None = None, token_dim: int | None = None,
                 meta_hidden: int | None = None):
        super().__init__()
        self.img2txt_kind = _choice("img2txt", img2txt, IMG2TXT)
        self.gamma_mode = _choice("gamma_mode", gamma_mode, GAMMA_MODES)
        self.txt_keys_from = _choice("txt_keys_from", txt_keys_from, TXT_KEYS_FROM)
        self.txt_keys_refresh = _choice("txt_keys_refresh", txt_keys_refresh, TXT_KEYS_REFRESH)
        check_cache(W, keys, values)
        if not 0.0 <= gamma <= 1.0:
            raise XmxError(f"gamma must lie in [0, 1], got {gamma}")
        if kappa < 0:
            raise XmxError(f"kappa must be >= 0 (0 disables the hard-sample weights), got {kappa}")
        NK, C = keys.shape
        N = W.shape[1]
        # the image cache, exactly as Tip-Adapter-F
        self.register_buffer("W", W.detach().float().clone())                            # [C, N]
        self.register_buffer("values", values.detach().float().clone())                  # [NK, N]
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.adapter = nn.Linear(C, NK, bias=False)                                       # weight [NK, C] = F_img
        with torch.no_grad():
            self.adapter.weight.copy_(keys.float())
        # the text cache
        self.register_buffer("beta_txt", torch.tensor(float(beta if beta_txt is None else beta_txt)))
        self.register_buffer("mean_view_keys", keys.detach().float().clone())            # [NK, C]
        self.register_buffer("txt_keys_cache", torch.empty(0), persistent=False)
        if self.img2txt_kind == "text_mixture":
            self.img2txt = TextMixture(W, img2txt_temp, learn_img2txt_temp, img2txt_proj, img2txt_bias)
        elif self.img2txt_kind == "linear":
            self.img2txt = LinearImg2Txt(C, img2txt_bias)
        else:
            if encode_prompt is None or token_dim is None:
                raise XmxError("img2txt=pseudo_token needs the online text encoder: pass encode_prompt and token_dim "
                               "(see make_pseudo_token_prompt), or use img2txt=text_mixture|linear")
            self.img2txt = PseudoTokenImg2Txt(C, token_dim, encode_prompt, meta_hidden)
        # fusion ratio
        if self.gamma_mode == "learned":
            if not 0.0 < gamma < 1.0:
                raise XmxError(f"gamma_mode=learned starts from sigmoid(logit(gamma)) and needs 0 < gamma < 1, "
                               f"got {gamma}")
            self.gamma_logit = nn.Parameter(torch.tensor(math.log(gamma / (1.0 - gamma))))
        else:
            self.register_buffer("gamma_value", torch.tensor(float(gamma)))
        # hard-sample weights
        self.kappa, self.tau = float(kappa), float(tau)
        self.shots = float(shots) if shots is not None else float(values.sum()) / N
        if self.shots <= 0:
            raise XmxError(f"shots (K) must be positive, got {self.shots}")

    # -- pieces --
    @property
    def gamma(self) -> Tensor:
        return torch.sigmoid(self.gamma_logit) if self.gamma_mode == "learned" else self.gamma_value

    def cache_keys(self) -> Tensor:
        """current (trained) image keys F_img [NK, C]."""
        return self.adapter.weight

    def _txt_keys_source(self) -> Tensor:
        return self.mean_view_keys if self.txt_keys_from == "mean_view" else self.adapter.weight

    def text_keys(self) -> Tensor:
        """F_txt = g(F_img) [NK, C] from the current g (or the cached copy when ``txt_keys_refresh=manual``)."""
        if self.txt_keys_refresh == "manual":
            if self.txt_keys_cache.numel() == 0:
                self.refresh_text_keys()
            return self.txt_keys_cache
        return self.img2txt(self._txt_keys_source())

    @torch.no_grad()
    def refresh_text_keys(self, batch_size: int = 4096) -> None:
        src = self._txt_keys_source()
        self.txt_keys_cache = torch.cat([self.img2txt(src[i:i + batch_size]) for i in range(0, src.shape[0],
                                                                                           batch_size)])

    @torch.no_grad()
    def set_hparams(self, alpha: float | None = None, beta: float | None = None, beta_txt: float | None = None,
                    gamma: float | None = None) -> None:
        """Apply searched values (``gamma`` only for gamma_mode fixed|searched)."""
        for name, v in (("alpha", alpha), ("beta", beta), ("beta_txt", beta_txt)):
            if v is not None:
                getattr(self, name).fill_(float(v))
        if gamma is not None:
            if self.gamma_mode == "learned":
                raise XmxError("gamma_mode=learned: gamma is a trained parameter and cannot be set by a search")
            self.gamma_value.fill_(float(gamma))

    def branches(self, f: Tensor) -> Branches:
        """f [B, C] raw -> zero-shot logits, both affinities and the fused logits."""
        check_feats(f, self.W)
        f = norm(f.to(self.W.dtype))                                                   # [B, C]
        zs = ZS_SCALE * f @ self.W                                                      # [B, N]
        A_img = affinity(self.adapter(f), self.beta)                                   # [B, NK]
        A_txt = affinity(self.img2txt(f) @ self.text_keys().T, self.beta_txt)          # [B, NK]
        gamma = self.gamma
        A = gamma * A_img + (1 - gamma) * A_txt                                        # [B, NK]
        return Branches(zs, A_img, A_txt, zs + self.alpha * (A @ self.values))

    def forward(self, f: Tensor) -> Tensor:
        """f [B, C] raw -> logits [B, N]."""
        return self.branches(f).logits

    def loss(self, f: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        """``mean_i (1 + d_i)^kappa CE_i`` (weights detached); with kappa = 0 plain cross-entropy.
        Returns (loss, {"weights": [B], "disagreement": [B], "logits": [B, N]})."""
        br = self.branches(f)
        w, d = hard_sample_weights(br.A_img, br.A_txt, self.values, self.tau, self.shots, self.kappa)
        if self.kappa == 0:
            loss = F.cross_entropy(br.logits, y)
        else:
            loss = (w * F.cross_entropy(br.logits, y, reduction="none")).mean()
        return loss, {"weights": w, "disagreement": d, "logits": br.logits.detach()}


# ---- validation search over (beta, beta_txt, alpha, gamma) --------------------------------------------------------
def gamma_grid(steps: int = 10) -> list[float]:
    """``[0, 1/steps, ..., 1]`` (both ends included: gamma = 1 is Tip-Adapter-F's image cache alone)."""
    return [i / steps for i in range(steps + 1)]


@dataclass
class XMSearchResult:
    """``grid[i, k, j, l]``: accuracy (%) at betas[i], betas_txt[k] (one entry ``None`` = tied to beta), alphas[j],
    gammas[l]. The best wins; ties keep the first in (beta, beta_txt, alpha, gamma) order."""
    alpha: float
    beta: float
    beta_txt: float
    gamma: float
    acc: float
    grid: Tensor
    betas: list[float]
    betas_txt: list[float] | None
    alphas: list[float]
    gammas: list[float]
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "beta_txt": self.beta_txt, "gamma": self.gamma,
                "val_acc": self.acc, "betas": self.betas, "betas_txt": self.betas_txt, "alphas": self.alphas,
                "gammas": self.gammas, "val_acc_grid": self.grid.tolist(), **self.extra}


@torch.no_grad()
def search_xmadapter(model: XMAdapter, f_val: Tensor, y_val: Tensor, beta_max: float, alpha_max: float,
                     n_beta: int = 200, n_alpha: int = 20, gammas: Sequence[float] | None = None,
                     betas_txt: Sequence[float] | None = None, max_elements: int = 1 << 28,
                     betas: Sequence[float] | None = None) -> XMSearchResult:
    """Vectorised search on validation features f_val [M, C] raw, y_val [M].

    beta and alpha use Tip-Adapter's grids (:func:`search_grid`); ``gammas`` defaults to :func:`gamma_grid` for
    ``gamma_mode=searched`` and to the model's own gamma otherwise; ``betas_txt`` None ties beta_txt to beta, or a
    list of values searched jointly; ``betas`` (optional) replaces the beta grid. Uses linearity:
    ``A L = gamma C_img + (1 - gamma) C_txt`` with
    ``C_* = exp(-beta_* (1 - S_*)) L``, so per beta all (beta_txt, alpha, gamma) are scored in one tensor op."""
    W, L = model.W, model.values
    check_feats(f_val, W)
    if y_val.ndim != 1 or y_val.shape[0] != f_val.shape[0] or f_val.shape[0] == 0:
        raise XmxError(f"search: {tuple(y_val.shape)} labels for {f_val.shape[0]} validation features "
                       "(need one label per feature and at least one feature)")
    if gammas is None:
        gammas = gamma_grid() if model.gamma_mode == "searched" else [float(model.gamma)]
    elif model.gamma_mode == "learned" and list(gammas) != [float(model.gamma)]:
        raise XmxError("gamma_mode=learned: gamma is trained, not searched; leave gammas unset")
    gammas = [float(g) for g in gammas]
    betas_l = search_grid(beta_max, n_beta) if betas is None else [float(b) for b in betas]
    n_beta = len(betas_l)
    alphas_l = search_grid(alpha_max, n_alpha)
    tied = betas_txt is None
    bt_l = betas_l if tied else [float(b) for b in betas_txt]
    dev, dt = W.device, W.dtype
    f = norm(f_val.to(dev, dt))                                                       # [M, C]
    y = y_val.to(dev).long()
    zs = ZS_SCALE * f @ W                                                             # [M, N]
    S_img = f @ model.cache_keys().T                                                  # [M, NK]
    S_txt = model.img2txt(f) @ model.text_keys().T                                    # [M, NK]
    beta_t = torch.tensor(betas_l, device=dev, dtype=dt)
    bts = torch.tensor(bt_l, device=dev, dtype=dt)
    alphas = torch.tensor(alphas_l, device=dev, dtype=dt)
    g = torch.tensor(gammas, device=dev, dtype=dt)[:, None, None, None]                # [G, 1, 1, 1]
    M, NK = S_img.shape
    N, nbt, G = L.shape[1], (1 if tied else len(bt_l)), len(gammas)
    correct = torch.zeros(n_beta, nbt, n_alpha, G, dtype=torch.long, device=dev)
    per_row = (n_beta + len(bt_l)) * N + 2 * NK + G * nbt * (1 + n_alpha) * N
    rows = chunk_rows(M, per_row, max_elements)

    def caches(S: Tensor, bs: Tensor) -> Tensor:                                      # -> [len(bs), m, N]
        step = chunk_rows(len(bs), S.shape[0] * S.shape[1], max_elements)
        return torch.cat([affinity(S[None], bs[i:i + step, None, None]) @ L for i in range(0, len(bs), step)])

    nb = chunk_rows(n_beta, rows * G * nbt * (1 + n_alpha) * N, max_elements)         # betas per chunk
    for r0 in range(0, M, rows):
        zs_r, y_r = zs[r0:r0 + rows], y[r0:r0 + rows]
        C_img = caches(S_img[r0:r0 + rows], beta_t)                                   # [n_beta, m, N]
        C_txt = caches(S_txt[r0:r0 + rows], bts)                                      # [n_bt, m, N]
        for b0 in range(0, n_beta, nb):
            C_i = C_img[b0:b0 + nb, None]                                             # [nb, 1, m, N]
            C_t = C_txt[b0:b0 + nb, None] if tied else C_txt[None]                    # [nb or 1, nbt, m, N]
            fused = g[:, None] * C_i[None] + (1 - g[:, None]) * C_t[None]             # [G, nb, nbt, m, N]
            cnt = correct_counts(zs_r, fused.flatten(0, 2), alphas, y_r)              # [G*nb*nbt, n_alpha]
            correct[b0:b0 + nb] += cnt.view(G, -1, nbt, n_alpha).permute(1, 2, 3, 0)  # [nb, nbt, n_alpha, G]
    flat = int(torch.argmax(correct.flatten()))
    rest, l_ = divmod(flat, G)
    rest, j = divmod(rest, n_alpha)
    i, k = divmod(rest, nbt)
    grid = correct.double().cpu() * (100.0 / M)
    return XMSearchResult(alpha=alphas_l[j], beta=betas_l[i], beta_txt=(betas_l[i] if tied else bt_l[k]),
                          gamma=gammas[l_], acc=float(grid[i, k, j, l_]), grid=grid, betas=betas_l,
                          betas_txt=None if tied else bt_l, alphas=alphas_l, gammas=gammas)


BETA_TXT_SEARCH = ("separate", "tied")


@torch.no_grad()
def search_beta_txt_separately(model: XMAdapter, f_val: Tensor, y_val: Tensor, beta_max: float, alpha_max: float,
                               n_beta: int = 200, n_alpha: int = 20, gammas: Sequence[float] | None = None,
                               max_elements: int = 1 << 28) -> XMSearchResult:
    """beta_txt searched on its own grid (docs/methods/xmadapter.md#search), in two stages: (beta, alpha, gamma) with
    beta_txt tied to beta;
    then, at that beta, (beta_txt, alpha, gamma) over Tip-Adapter's beta grid. The second stage contains the tied
    point, so it never scores lower; it replaces the first only when strictly better. A joint 4-D search
    (``search_betas_txt: [values]``) costs n_beta times more."""
    tied = search_xmadapter(model, f_val, y_val, beta_max, alpha_max, n_beta, n_alpha, gammas=gammas,
                            max_elements=max_elements)
    sep = search_xmadapter(model, f_val, y_val, beta_max, alpha_max, n_beta, n_alpha, gammas=gammas,
                           betas_txt=search_grid(beta_max, n_beta), betas=[tied.beta], max_elements=max_elements)
    best = sep if sep.acc > tied.acc else tied
    best.extra.update(beta_txt_search="separate", tied_val_acc=tied.acc, separate_val_acc=sep.acc,
                      val_acc_per_beta_txt=[round(float(a), 4) for a in sep.grid[0].flatten(1).max(dim=1).values])
    return best


# =================================================================================================================
# The Lightning module (method layer): XMAdapter trained like Tip-Adapter-F (cached `tip` views, one per epoch, epoch
# selected on validation), then (beta, [beta_txt,] alpha[, gamma]) searched on validation before testing.
# =================================================================================================================
class XMAdapterMethod(TipAdapterFMethod):
    """XMAdapter (docs/methods/xmadapter.md#reconstruction) on cached features; every option of :class:`XMAdapter` is
    a constructor argument (a key
    of ``conf/method/xmadapter.yaml``). Per-dataset search ranges and initial alpha/beta as Tip-Adapter-F.

    ``gamma_mode``: ``fixed`` (``gamma`` throughout), ``searched`` (trained at ``gamma``, then searched on the
    validation grid ``gamma_grid(gamma_steps)`` with beta/alpha) or ``learned`` (``sigmoid`` of a trained scalar
    starting at ``gamma``). ``search_betas_txt``: ``separate`` (default: beta_txt on its own grid after the tied
    search, :func:`search_beta_txt_separately`), ``tied``/null (beta_txt = beta), or a list searched jointly. The
    text branch trains by default (``img2txt_proj`` and ``learn_img2txt_temp`` on;
    docs/methods/xmadapter.md#text-branch).
    The search runs on ``search_device`` like Tip-Adapter's (the model visits it for the search)."""

    def __init__(self, img2txt: str = "text_mixture", img2txt_temp: float = 100.0, learn_img2txt_temp: bool = True,
                 img2txt_proj: bool = True, img2txt_bias: bool = False, txt_keys_from: str = "mean_view",
                 txt_keys_refresh: str = "step", beta_txt: float | None = None, gamma: float = 0.5,
                 gamma_mode: str = "searched", gamma_steps: int = 10,
                 search_betas_txt: str | Sequence[float] | None = "separate",
                 kappa: float = 1.0, tau: float = 50.0, shots: float | None = None,
                 pseudo_template: str = "a photo of a {}.", meta_hidden: int | None = None, **kwargs):
        super().__init__(**kwargs)
        _choice("img2txt", img2txt, IMG2TXT)                 # refuse bad options before features are extracted
        _choice("gamma_mode", gamma_mode, GAMMA_MODES)
        _choice("txt_keys_from", txt_keys_from, TXT_KEYS_FROM)
        _choice("txt_keys_refresh", txt_keys_refresh, TXT_KEYS_REFRESH)
        if int(gamma_steps) < 1:
            raise XmxError(f"method.gamma_steps={gamma_steps}: the gamma grid needs at least 1 step")
        self.options = dict(img2txt=img2txt, img2txt_temp=float(img2txt_temp),
                            learn_img2txt_temp=bool(learn_img2txt_temp), img2txt_proj=bool(img2txt_proj),
                            img2txt_bias=bool(img2txt_bias), txt_keys_from=txt_keys_from,
                            txt_keys_refresh=txt_keys_refresh, gamma=float(gamma), gamma_mode=gamma_mode,
                            kappa=float(kappa), tau=float(tau), shots=None if shots is None else float(shots),
                            meta_hidden=meta_hidden)
        self.beta_txt = None if beta_txt is None else float(beta_txt)
        self.gamma_steps = int(gamma_steps)
        if isinstance(search_betas_txt, str) and search_betas_txt not in BETA_TXT_SEARCH:
            raise XmxError(f"method.search_betas_txt={search_betas_txt!r}; valid choices: separate (its own grid, "
                           "after the tied search), tied (or null), or a list of values searched jointly")
        self.search_betas_txt = (None if search_betas_txt in (None, "tied") else search_betas_txt
                                 if isinstance(search_betas_txt, str) else [float(b) for b in search_betas_txt])
        self.pseudo_template = pseudo_template

    def make_model(self, keys, values, W, dm) -> nn.Module:
        encode_prompt = token_dim = None
        if self.options["img2txt"] == "pseudo_token":
            encode_prompt, token_dim = make_pseudo_token_prompt(dm.backbone, self.pseudo_template)
        return XMAdapter(keys, values, W, alpha=self.hp["init_alpha"], beta=self.hp["init_beta"],
                         beta_txt=self.beta_txt, encode_prompt=encode_prompt, token_dim=token_dim, **self.options)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, info = self.model.loss(self.image_features(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/hard_weight", info["weights"].mean(), batch_size=len(y))
        if self.model.gamma_mode == "learned":
            self.log("train/gamma", self.model.gamma.detach(), batch_size=len(y))
        return loss

    def _refresh(self) -> None:
        if self.model.txt_keys_refresh == "manual":
            self.model.refresh_text_keys()

    def on_train_epoch_start(self) -> None:
        self._refresh()

    def on_validation_epoch_start(self) -> None:
        self._refresh()

    def on_test_start(self) -> None:
        self._refresh()
        super().on_test_start()

    # ---- validation search ------------------------------------------------------------------------------------
    @torch.no_grad()
    def search_on_validation(self, dm) -> None:
        m = self.model
        home, dev = m.W.device, self._device_for_search()
        sel = self.selection_set(dm)  # validation (selection=paper on ImageNet: test, as Tip-Adapter's release)
        f_val, y_val = dm.features_of(sel).float(), torch.tensor([d.label for d in sel.items])
        gammas = gamma_grid(self.gamma_steps) if m.gamma_mode == "searched" else None
        m.to(dev)  # the search runs where the model's tensors are
        try:
            if self.search_betas_txt == "separate":
                res = search_beta_txt_separately(m, f_val.to(dev), y_val.to(dev), self.hp["beta_max"],
                                                 self.hp["alpha_max"], self.hp["n_beta"], self.hp["n_alpha"],
                                                 gammas=gammas)
            else:
                res = search_xmadapter(m, f_val.to(dev), y_val.to(dev), self.hp["beta_max"], self.hp["alpha_max"],
                                       self.hp["n_beta"], self.hp["n_alpha"], gammas=gammas,
                                       betas_txt=self.search_betas_txt)
        finally:
            m.to(home)
        m.set_hparams(alpha=res.alpha, beta=res.beta, beta_txt=res.beta_txt,
                      gamma=None if m.gamma_mode == "learned" else res.gamma)
        full = self.results_grid is True or (self.results_grid == "auto" and res.grid.numel() <= FULL_GRID_CELLS)
        per_gamma = res.grid.permute(3, 0, 1, 2).flatten(1).max(dim=1).values
        self.search_result = {"alpha": res.alpha, "beta": res.beta, "beta_txt": res.beta_txt, "gamma": res.gamma,
                              "val_acc": res.acc, "alphas": res.alphas, "gammas": res.gammas,
                              "betas_txt": res.betas_txt,
                              "beta_txt_search": ("separate" if self.search_betas_txt == "separate" else
                                                  "tied" if self.search_betas_txt is None else "joint"),
                              **{k: v for k, v in res.extra.items() if k != "beta_txt_search"},
                              "best_val_acc_per_gamma": [round(float(a), 4) for a in per_gamma],
                              **grid_summary(res.grid, res.betas, full)}
        log.info("xmadapter: alpha %.4g, beta %.4g, beta_txt %.4g, gamma %.3g searched on %s (%.2f%%)",
                 res.alpha, res.beta, res.beta_txt, res.gamma, sel.name, res.acc)

    def extra_results(self) -> dict:
        out = super().extra_results()
        m = getattr(self, "model", None)
        if m is not None:
            sr = self.search_result or {}
            learned = m.gamma_mode == "learned"
            out.update(beta_txt=sr.get("beta_txt", float(m.beta_txt)),
                       gamma=float(m.gamma) if learned else sr.get("gamma", float(m.gamma)), gamma_mode=m.gamma_mode,
                       kappa=m.kappa, tau=m.tau, shots_K=m.shots, img2txt=m.img2txt_kind)
        out["reimplementation"] = "XMAdapter has no public code; this is xmx's reconstruction (docs/methods/xmadapter.md#reconstruction)"
        return out
