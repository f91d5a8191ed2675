"""Image feature extraction through a frozen CLIP image encoder, optionally cached in the :class:`FeatureStore`.

Two ways to turn files into normalised ``[3, S, S]`` inputs, both with the same transforms (spec §0):

- ``decode="pil"`` (reference, CPU): PIL decodes in DataLoader workers (``.convert("RGB")`` handles CMYK, greyscale
  and PNG files named ``.jpg``), torchvision's functional transforms resize/crop the PIL image.
- ``decode="gpu"`` (fast path; ``decode="tensor"`` runs the same code on the CPU, for tests): workers only read
  file bytes (and the JPEG header, for the crop parameters);
  ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes a batch with nvjpeg, and the same functional
  transforms resize/crop the uint8 tensors on the GPU; the encoder runs under autocast. Files that are not
  RGB/greyscale JPEGs (PNG, CMYK, ...) or that nvjpeg rejects are decoded by PIL and then follow the same tensor ops.
  Without CUDA, ``decode="gpu"`` falls back to ``"pil"``.

Presets: ``none`` = the backbone's eval transform (its ``resize_mode``: ``shortest`` = resize the short side to S and
centre crop S, as OpenAI's CLIP; ``squash`` = resize to S x S ignoring the aspect ratio, as SigLIP, DFN and PE;
``longest`` = resize the long side to S and pad to S x S with zeros; with the backbone's interpolation); ``tip`` =
RandomResizedCrop(S, scale (0.5, 1), bicubic) + horizontal flip; ``coop`` = the same with scale (0.08, 1). CLIP
mean/std normalisation always; optional Gaussian noise ``noise_std`` added to the normalised image (spec §3.8).
Every random draw of view ``v`` of item ``i`` comes from a generator seeded by ``(seed, v, i)``, so the result does
not depend on worker count or batch size, and both decode paths use the very same crops, flips and noise.

Outputs are raw encoder features (spec §0) ``[V, N, C]`` in the store precision (fp16 or fp32); with
``output="pre_projection"`` the features before the image encoder's final linear projection ``[V, N, D]`` (ProLIP
trains that projection), stored as their own entry kind (:data:`OUTPUT_KINDS`) under the same key fields.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from xmx.data.images import check_unreadable, open_rgb
from xmx.data.transforms import PRESETS  # preset -> RandomResizedCrop scale (None: CLIP eval transform)
from xmx.errors import XmxError
from xmx.features.store import FeatureStore, tensors_checksum
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

EXTRACT_VERSION = 1  # bump when a change here changes the numbers: it is part of every feature key
RESIZE_MODES = ("shortest", "squash", "longest")
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_JPEG_MAGIC = b"\xff\xd8\xff"
# what the encoder returns -> (store entry kind, the key's "output" field)
OUTPUT_KINDS = {"raw": ("image_features", "image_features_raw"),
                "pre_projection": ("image_features_preproj", "image_features_pre_projection")}


def check_output(output: str) -> str:
    if output not in OUTPUT_KINDS:
        raise XmxError(f"image feature output {output!r}; valid choices: {', '.join(OUTPUT_KINDS)}")
    return output


def _seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ---- the transform, shared by both decode paths -------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """Geometry + normalisation + noise of one preset, with the per-(seed, view, index) random draws."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    preset: str = "none"
    noise_std: float = 0.0
    seed: int = 0
    resize_mode: str = "shortest"  # the eval geometry: shortest | squash | longest (open_clip's names)

    @classmethod
    def from_backbone(cls, backbone, preset: str = "none", noise_std: float = 0.0, seed: int = 0) -> "Preprocess":
        if preset not in PRESETS:
            raise XmxError(f"unknown augmentation preset {preset!r}; valid choices: {', '.join(PRESETS)}")
        if not noise_std >= 0:
            raise XmxError(f"noise_std must be >= 0, got {noise_std}")
        resize_mode = str(getattr(backbone, "resize_mode", "shortest"))
        if resize_mode not in RESIZE_MODES:
            raise XmxError(f"backbone resize mode {resize_mode!r} is not supported; valid: {', '.join(RESIZE_MODES)}")
        return cls(backbone.image_size, tuple(backbone.image_mean), tuple(backbone.image_std),
                   str(backbone.interpolation), preset, float(noise_std), int(seed), resize_mode)

    @property
    def deterministic(self) -> bool:
        """True when every view of an image is the same (eval transform, no noise)."""
        return PRESETS[self.preset] is None and self.noise_std == 0

    @property
    def _interp(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def view_params(self, index: int, view: int, height: int, width: int) -> tuple | None:
        """Crop box ``(top, left, h, w)`` and flip for view ``view`` of item ``index`` of an ``height x width``
        image; None for the eval transform. torchvision draws from the global RNG, so it runs inside a fork."""
        scale = PRESETS[self.preset]
        if scale is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, view, index, "crop"))
            # get_params only reads the (C, H, W) of its argument: an expanded 1-element tensor costs nothing
            top, left, h, w = RandomResizedCrop.get_params(torch.empty(1).expand(3, height, width), list(scale),
                                                           list(RATIO))
            flip = bool(torch.rand(1) < 0.5)
        return top, left, h, w, flip

    def noise(self, index: int, view: int) -> torch.Tensor | None:
        """Gaussian noise [3,S,S] (fp32) added to the normalised image, or None."""
        if self.noise_std == 0:
            return None
        g = torch.Generator().manual_seed(_seed(self.seed, view, index, "noise"))
        return torch.randn(3, self.size, self.size, generator=g) * self.noise_std

    def geometry(self, img, params):
        """PIL image or uint8 tensor [..,3,H,W] -> the same type at [..,3,S,S] (the preset's resize/crop/flip)."""
        if params is None:
            S = self.size
            if self.resize_mode == "squash":
                return TF.resize(img, [S, S], interpolation=self._interp, antialias=True)
            if self.resize_mode == "longest":  # open_clip's ResizeKeepRatio(longest=1) + CenterCropOrPad (fill 0)
                h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[-2:]
                r = max(h, w) / S
                img = TF.resize(img, [round(h / r), round(w / r)], interpolation=self._interp, antialias=True)
                return TF.center_crop(img, [S, S])  # pads with zeros where the image is smaller
            img = TF.resize(img, [S], interpolation=self._interp, antialias=True)
            return TF.center_crop(img, [S, S])
        top, left, h, w, flip = params
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=self._interp,
                              antialias=True)
        return TF.horizontal_flip(img) if flip else img

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..,3,S,S] -> float32 CLIP-normalised (same as ToTensor + Normalize)."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x.float() / 255.0 - mean) / std

    # ---- the two single-image reference paths (the tests compare them) ------------------------------------------
    def pil_view(self, img: Image.Image, index: int, view: int) -> torch.Tensor:
        """PIL RGB image -> normalised float [3,S,S] (+ noise): the reference path."""
        x = self.normalise(TF.pil_to_tensor(self.geometry(img, self.view_params(index, view, img.height, img.width))))
        n = self.noise(index, view)
        return x if n is None else x + n

    def tensor_view(self, img: torch.Tensor, index: int, view: int) -> torch.Tensor:
        """uint8 [3,H,W] (any device) -> normalised float [3,S,S] (+ noise): what the GPU path does per image."""
        x = self.normalise(self.geometry(img, self.view_params(index, view, img.shape[-2], img.shape[-1])))
        n = self.noise(index, view)
        return x if n is None else x + n.to(x.device)


def _one_line(path, e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{path}: {type(e).__name__}: {text}"


def unreadable_message(first: str, more: int = 0, key: str = "data.unreadable") -> str:
    return (f"cannot read image {first}" + (f" (+{more} more)" if more else "")
            + f"; replace the file, or set {key}=skip to leave such files out")


# ---- datasets run in DataLoader workers ---------------------------------------------------------------------------
class _PILViews(Dataset):
    """item i -> {"index", "x": normalised [V,3,S,S]} or {"index", "error"}."""

    def __init__(self, paths: Sequence[str], pp: Preprocess, views: int):
        self.paths, self.pp, self.views = paths, pp, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = open_rgb(self.paths[i])
        except Exception as e:  # noqa: BLE001 - reported as one line by the main process
            return {"index": i, "error": _one_line(self.paths[i], e)}
        return {"index": i, "x": torch.stack([self.pp.pil_view(img, i, v) for v in range(self.views)])}


def _errors(items) -> list[tuple[int, str]]:
    return [(it["index"], it["error"]) for it in items if "error" in it]


def _collate_pil(items):
    """Readable items stacked; unreadable ones listed as ``errors`` [(index, one line)] (the caller's policy)."""
    errors = _errors(items)
    items = [it for it in items if "error" not in it]
    return {"index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "x": torch.stack([it["x"] for it in items]) if items else None, "errors": errors}


def read_for_decode(path) -> tuple[bytes | None, torch.Tensor | None, int, int]:
    """``(jpeg bytes, None, height, width)`` for an RGB/greyscale JPEG (only its header is parsed here: the decode
    happens later, batched, on the GPU), else ``(None, uint8 [3,H,W] decoded by PIL, height, width)`` (PNG, CMYK,
    ...: whatever :func:`open_rgb` reads). Raises what PIL raises for a file it cannot read."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        width, height = im.size
        jpeg = data[:3] == _JPEG_MAGIC and im.format == "JPEG" and im.mode in ("RGB", "L")
        image = None if jpeg else TF.pil_to_tensor(im.convert("RGB"))  # uint8 [3,H,W]
    return (data if jpeg else None), image, height, width


class _JPEGBytes(Dataset):
    """item i -> file bytes (JPEG for nvjpeg) or a PIL-decoded uint8 image (anything else), the per-view crop
    parameters (from the header's size) and noise; the expensive work happens later, on the GPU."""

    def __init__(self, paths: Sequence[str], pp: Preprocess, views: int):
        self.paths, self.pp, self.views = paths, pp, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            data, image, height, width = read_for_decode(path)
        except Exception as e:  # noqa: BLE001
            return {"index": i, "error": _one_line(path, e)}
        noise = [self.pp.noise(i, v) for v in range(self.views)]
        return {"index": i, "data": data, "image": image,
                "params": [self.pp.view_params(i, v, height, width) for v in range(self.views)],
                "noise": None if noise[0] is None else torch.stack(noise).half()}  # [V,3,S,S], fp16 halves IPC


def _collate_bytes(items):
    """One shared-memory blob per batch instead of one tensor per file (keeps file descriptors in check)."""
    errors = _errors(items)
    items = [it for it in items if "error" not in it]
    if not items:
        return {"index": torch.empty(0, dtype=torch.long), "errors": errors}
    blobs = [it["data"] or b"" for it in items]
    offsets = [0]
    for b in blobs:
        offsets.append(offsets[-1] + len(b))
    blob = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offsets[-1] else torch.empty(0, dtype=torch.uint8)
    out = {"index": torch.tensor([it["index"] for it in items]), "blob": blob, "offsets": offsets,
           "images": [it["image"] for it in items], "params": [it["params"] for it in items],
           "noise": None if items[0]["noise"] is None else torch.stack([it["noise"] for it in items]),
           "errors": errors}
    if "label" in items[0]:  # the online training path's batches carry their labels
        out["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return out


# ---- extraction ---------------------------------------------------------------------------------------------------
def resolve_decode(decode: str, device: torch.device, key: str = "decode") -> str:
    """``auto`` -> ``gpu`` on a CUDA device, else ``pil``; ``gpu`` without CUDA -> ``pil`` (logged); ``tensor`` (the
    fast path's code on any device: torchvision decode + tensor transforms; on CPU, for tests) -> ``gpu`` on CUDA.
    ``key``: the config key named in the messages (``features.decode``, ``data.decode``)."""
    if decode not in ("auto", "pil", "gpu", "tensor"):
        raise XmxError(f"{key}={decode!r}; valid choices: auto, pil, gpu, tensor")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if decode == "tensor":
        return "gpu" if cuda else "tensor"
    if decode == "gpu" and not cuda:
        log.warning("%s=gpu needs a CUDA device; using the PIL path on %s", key, device)
    return "gpu" if decode in ("auto", "gpu") and cuda else "pil"


def _default_device(device) -> torch.device:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # nvjpeg and events want an explicit index
    return device


def _as_paths(images, root) -> list[str]:
    """Absolute paths from paths (absolute, or relative to ``root``) or Datums (relative to the $DATA ``root``)."""
    out = []
    for it in images:
        p = getattr(it, "path", it)
        p = Path(p)
        if not p.is_absolute():
            if root is None:
                raise XmxError(f"image path {p} is relative but no data root was given; pass root=<$DATA folder>")
            p = Path(root) / p
        out.append(str(p))
    return out


def _gpu_decode(blobs: list[torch.Tensor], device: torch.device) -> list:
    """JPEG bytes (CPU uint8 [n]) -> uint8 RGB [3,H,W] on ``device``: one batched nvjpeg call; should nvjpeg reject
    the batch, image by image, and PIL for the ones it cannot decode at all; an exception (the file is unreadable)
    in place of an image that PIL cannot decode either."""
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io in favour of torchcodec
        try:
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            out = []
            for b in blobs:
                try:
                    out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    try:
                        with Image.open(io.BytesIO(b.numpy().tobytes())) as im:
                            out.append(TF.pil_to_tensor(im.convert("RGB")).to(device))
                    except Exception as e:  # noqa: BLE001 - the caller applies the unreadable-file policy
                        out.append(e)
            return out


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        self.beat, self.done = Heartbeat(label, total=total), 0  # without a bar: a log line every 10 s
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self.task = self.bar.add_task(label, total=total, rate="")
            self.bar.start()

    def update(self, n: int, rate: float):
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{rate:,.0f} img/s")
        else:
            self.beat(self.done, f"{rate:,.0f} img/s")

    def stop(self):
        if self.bar is not None and self.bar.live.is_started:
            self.bar.stop()

    def finish(self, line: str):
        if self.bar is not None:  # the line itself is logged once by the caller
            self.stop()


@torch.no_grad()
def extract_image_features(backbone, images: Sequence, root: str | os.PathLike | None = None, *,
                           preset: str = "none", views: int = 1, seed: int = 0, noise_std: float = 0.0,
                           precision: str = "fp16", decode: str = "auto", device=None, amp: str = "fp16",
                           batch_size: int = 256, num_workers: int | None = None, progress: bool = True,
                           stats: dict | None = None, output: str = "raw", unreadable: str = "error",
                           skipped: list | None = None, policy_key: str = "data.unreadable") -> torch.Tensor:
    """Raw image features ``[V, N, C]`` (CPU, ``precision``) of ``images`` (absolute paths, or paths / Datums
    relative to ``root``) under ``views`` draws of ``preset`` (+ ``noise_std``).

    ``device``: where the encoder runs (default cuda when available; the backbone is moved there for the call and
    moved back). ``amp``: autocast dtype on CUDA (fp16/bf16/fp32; CPU always runs fp32). ``batch_size``: images x
    views per encoder call. ``stats`` (optional dict) receives images, seconds, images_per_s, decode and counts.
    ``output``: ``raw`` (the embeddings) or ``pre_projection`` (before the final image projection, width D).
    ``unreadable``: ``error`` stops at the first file no decoder reads, naming it; ``skip`` leaves such files out
    (their rows stay zero) and appends ``(index, one line)`` for each to the list ``skipped``.
    """
    project = check_output(output) == "raw"
    check_unreadable(unreadable)
    if precision not in PRECISIONS:
        raise XmxError(f"features precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if amp not in AMP:
        raise XmxError(f"amp must be one of {', '.join(AMP)}, got {amp!r}")
    if not isinstance(views, int) or views < 1:
        raise XmxError(f"views must be a positive integer, got {views!r}")
    pp = Preprocess.from_backbone(backbone, preset, noise_std, seed)
    paths = _as_paths(images, root)
    device = _default_device(device)
    decode = resolve_decode(decode, device)
    v_run = 1 if pp.deterministic else views  # identical views are encoded once and repeated
    per_batch = max(1, batch_size // v_run)
    if num_workers is None:
        num_workers = min(16 if decode == "gpu" else 8, max(0, (os.cpu_count() or 1) - 1))
    fast = decode in ("gpu", "tensor")
    ds = (_JPEGBytes if fast else _PILViews)(paths, pp, v_run)
    loader = DataLoader(ds, batch_size=per_batch, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_bytes if fast else _collate_pil,
                        prefetch_factor=4 if num_workers else None, persistent_workers=False,
                        pin_memory=device.type == "cuda" and not fast)  # the fast path ships bytes, not pixels
    amp_dtype = AMP[amp] if device.type == "cuda" else None
    home = backbone.device
    backbone.to(device)
    width = backbone.embed_dim if project else backbone.pre_projection_dim
    out = torch.zeros(v_run, len(paths), width, dtype=PRECISIONS[precision])  # [V,N,C] (or [V,N,D]); skipped rows: 0
    counts = {"gpu_decoded": 0, "cpu_decoded": 0}
    bar = _Progress(progress, len(paths) * v_run, f"image features ({decode}, {backbone.name})")
    t0 = time.perf_counter()
    done = 0
    pending = None  # the previous batch's features, copied to the host without blocking the GPU

    def land(p):  # wait for one batch's copy and scatter it into `out`
        b_idx, host, event = p
        if event is not None:
            event.synchronize()
        out[:, b_idx] = host.view(len(b_idx), v_run, -1).transpose(0, 1).to(out.dtype)  # [V,B,C]

    batches = _decode_ahead(loader, device, counts, paths=paths) if fast else ((b, None) for b in loader)
    bad: list[tuple[int, str]] = []
    try:
        for batch, imgs in batches:
            if batch["errors"]:
                if unreadable == "error":
                    raise XmxError(unreadable_message(batch["errors"][0][1], len(batch["errors"]) - 1, policy_key))
                bad.extend(batch["errors"])
                bar.update(len(batch["errors"]) * v_run, done / max(time.perf_counter() - t0, 1e-9))
            idx = batch["index"]  # [B]
            if not len(idx):
                continue
            if fast:
                x = _transform_batch(batch, imgs, pp, device)  # [B*V,3,S,S] float on device
            else:
                x = batch["x"].flatten(0, 1)  # [B,V,3,S,S] -> [B*V,3,S,S]
                counts["cpu_decoded"] += len(idx)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                f = backbone.encode_image(x.to(device, non_blocking=True), project=project)  # [B*V,C]
            if device.type == "cuda":  # no host sync here: the CPU goes on to prepare the next batch
                host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
                host.copy_(f, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = f, None
            if pending is not None:
                land(pending)
            pending = (idx, host, event)
            done += len(idx) * v_run
            bar.update(len(idx) * v_run, done / max(time.perf_counter() - t0, 1e-9))
        if pending is not None:
            land(pending)
    finally:
        if fast:
            batches.close()  # stops the decode thread
        backbone.to(home)
        bar.stop()  # also when a file cannot be read: never leave a live display behind
    seconds = time.perf_counter() - t0
    rate = done / max(seconds, 1e-9)
    line = (f"extracted {len(paths) - len(bad)} images x {v_run} views in {seconds:.1f}s: {rate:,.0f} images/s "
            f"(decode={decode}, device={device}, {backbone.name})"
            + (f"; skipped {len(bad)} unreadable (data.unreadable=skip), e.g. {bad[0][1]}" if bad else ""))
    bar.finish(line)
    log.info(line)
    if stats is not None:
        stats.update(images=len(paths), views=views, encoded=done, seconds=seconds, images_per_s=rate,
                     decode=decode, device=str(device), skipped=len(bad), **counts)
    if skipped is not None:
        skipped.extend(sorted(bad))
    return out.expand(views, -1, -1).clone() if v_run != views else out


def _decode_batch(batch: dict, device: torch.device, counts: dict, paths: Sequence[str] = ()) -> list[torch.Tensor]:
    """A collated byte batch -> its images, uint8 [3,H,W] each: JPEGs decoded on ``device`` in one batched call
    (nvjpeg on CUDA), the PIL-decoded fallbacks moved there."""
    offsets, blob = batch["offsets"], batch["blob"]
    jpeg_pos = [k for k, im in enumerate(batch["images"]) if im is None]
    decoded = _gpu_decode([blob[offsets[k]:offsets[k + 1]] for k in jpeg_pos], device) if jpeg_pos else []
    imgs = list(batch["images"])
    for k, im in zip(jpeg_pos, decoded):
        imgs[k] = im
    bad = [k for k, im in enumerate(imgs) if isinstance(im, BaseException)]
    if bad:  # a body that no decoder reads (truncated, garbage after a valid header): out of the batch, as errors
        for k in bad:
            i = int(batch["index"][k])
            batch["errors"].append((i, _one_line(paths[i] if i < len(paths) else f"image #{i}", imgs[k])))
        keep = [k for k in range(len(imgs)) if k not in set(bad)]
        batch["index"] = batch["index"][keep]
        batch["params"] = [batch["params"][k] for k in keep]
        if batch["noise"] is not None:
            batch["noise"] = batch["noise"][keep]
        if "label" in batch:
            batch["label"] = batch["label"][keep]
        imgs = [imgs[k] for k in keep]
        jpeg_pos = [k for k in jpeg_pos if k not in set(bad)]
    counts["gpu_decoded" if device.type == "cuda" else "cpu_decoded"] += len(jpeg_pos)
    counts["cpu_decoded"] += len(imgs) - len(jpeg_pos)
    return [im.to(device, non_blocking=True) for im in imgs]


def _transform_batch(batch: dict, imgs: list[torch.Tensor], pp: Preprocess, device: torch.device) -> torch.Tensor:
    """Decoded images (uint8 [3,H,W] on ``device``) + the batch's view parameters and noise -> normalised float
    [B*V,3,S,S] (image-major, view-minor: the order the PIL path flattens [B,V,...] in)."""
    crops = []
    for im, params in zip(imgs, batch["params"]):
        crops.extend(pp.geometry(im, p) for p in params)  # V x uint8 [3,S,S]
    x = pp.normalise(torch.stack(crops))  # [B*V,3,S,S]
    if batch["noise"] is not None:
        x = x + batch["noise"].to(device, non_blocking=True).flatten(0, 1).float()
    return x


_END = object()


def _decode_ahead(loader, device: torch.device, counts: dict, depth: int = 2, paths: Sequence[str] = ()):
    """Yields ``(batch, images)`` with the decode of the next batches running in a thread (the decoder releases
    the GIL), so that decoding overlaps the per-image resize/crop of the current batch in the caller's thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch in loader:
                if not put((batch, _decode_batch(batch, device, counts, paths) if len(batch["index"]) else [])):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=work, name="xmx-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---- keys and the store -------------------------------------------------------------------------------------------
_PARAMS_SHA: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # backbone -> checksum (frozen weights)


def backbone_identity(backbone) -> dict:
    """What identifies the encoder's numbers: the weights file's sha256, or for random init a checksum of the
    parameters themselves (two random inits must never share an entry; computed once per backbone object)."""
    d = backbone.describe()
    ident = {k: d.get(k) for k in ("name", "arch", "precision", "sha256", "random_init", "quick_gelu")}
    for k in ("loader", "tokenizer"):  # the text side (classifier keys) also depends on the tokenizer
        if d.get(k) is not None:
            ident[k] = d[k]
    if not d.get("sha256"):
        if backbone not in _PARAMS_SHA:
            _PARAMS_SHA[backbone] = tensors_checksum(dict(backbone.model.state_dict()))
        ident["params_sha256"] = _PARAMS_SHA[backbone]
    return ident


def paths_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\n".encode())
    return h.hexdigest()


def image_feature_key(backbone, *, dataset: str, split: str, subset_digest: str, n: int, preset: str = "none",
                      views: int = 1, seed: int = 0, noise_std: float = 0.0, precision: str = "fp16",
                      decode: str = "pil", amp: str = "fp16", device_type: str = "cpu", output: str = "raw",
                      content: str | None = None) -> dict:
    """The store key for image features: everything that changes the numbers. ``decode`` must be resolved
    (``pil``/``gpu``); the seed is dropped when the views are deterministic (eval features shared across seeds).
    ``output`` (raw / pre_projection) names what the encoder returned; the entry kind follows it too.
    ``content``: the fingerprint of the image files' bytes (:mod:`xmx.data.fingerprint`), so that another copy of
    the data with one file changed never reuses an entry."""
    pp = Preprocess.from_backbone(backbone, preset, noise_std, seed)
    return {"extract_version": EXTRACT_VERSION, "output": OUTPUT_KINDS[check_output(output)][1],
            "backbone": backbone_identity(backbone),
            "image_size": pp.size, "mean": list(pp.mean), "std": list(pp.std), "interpolation": pp.interpolation,
            "resize_mode": pp.resize_mode,
            "preset": preset, "noise_std": float(noise_std), "views": int(views),
            "seed": None if pp.deterministic else int(seed), "dataset": dataset, "split": split,
            "subset": subset_digest, "n": int(n), "precision": precision, "decode": decode,
            "compute": amp if device_type == "cuda" else "fp32", "content": content}


def cached_image_features(store: FeatureStore, backbone, items: Sequence, root: str | os.PathLike | None = None, *,
                          dataset: str, split: str, preset: str = "none", views: int = 1, seed: int = 0,
                          noise_std: float = 0.0, precision: str = "fp16", decode: str = "auto", device=None,
                          amp: str = "fp16", batch_size: int = 256, num_workers: int | None = None,
                          progress: bool = True, output: str = "raw", content: str | None = None,
                          fingerprint: str = "content", fingerprint_cache: str | os.PathLike | None = None,
                          unreadable: str = "error", skipped: list | None = None) -> torch.Tensor:
    """``extract_image_features`` through the store: raw features ``[V, N, C]`` of ``items`` (Datums relative to
    the $DATA ``root``, or paths). The subset digest is over (path, label) for Datums, over the paths otherwise.
    ``output="pre_projection"``: the features before the image projection, in their own entry kind.
    The key holds the fingerprint of the files' bytes: ``content`` when the caller has it, else computed here
    (``fingerprint`` mode, cached under ``fingerprint_cache``). ``unreadable``/``skipped`` as in
    :func:`extract_image_features`; the skipped indices are stored with the entry, so a later ``error`` run on the
    same bytes stops naming the file. ``store.last_outcome`` says hit / miss / rebuilt."""
    from xmx.data.fewshot import subset_digest
    from xmx.data.fingerprint import fingerprint_files
    check_unreadable(unreadable)
    items = list(items)
    digest = subset_digest(items) if items and hasattr(items[0], "label") else paths_digest([str(p) for p in items])
    if content is None:
        rel = [str(getattr(it, "path", it)) for it in items]
        content = fingerprint_files(root if root is not None else "/", rel, mode=fingerprint,
                                    cache_dir=fingerprint_cache)["digest"]
    device = _default_device(device)
    decode = resolve_decode(decode, device)
    key = image_feature_key(backbone, dataset=dataset, split=split, subset_digest=digest, n=len(items),
                            preset=preset, views=views, seed=seed, noise_std=noise_std, precision=precision,
                            decode=decode, amp=amp, device_type=device.type, output=output, content=content)

    def compute():
        bad: list = []
        out = {"features": extract_image_features(
            backbone, items, root, preset=preset, views=views, seed=seed, noise_std=noise_std, precision=precision,
            decode=decode, device=device, amp=amp, batch_size=batch_size, num_workers=num_workers,
            progress=progress, output=output, unreadable=unreadable, skipped=bad)}
        if bad:
            out["skipped"] = torch.tensor([i for i, _ in bad], dtype=torch.long)
        return out

    entry = store.get_or_compute(OUTPUT_KINDS[output][0], key, compute)
    if "skipped" in entry:
        idx = entry["skipped"].tolist()
        paths = _as_paths([items[i] for i in idx], root)
        if unreadable == "error":
            raise XmxError(unreadable_message(f"{paths[0]} (no decoder reads it)", len(idx) - 1))
        if skipped is not None:
            skipped.extend((i, f"{p}: unreadable") for i, p in zip(idx, paths))
    return entry["features"]


def list_image_folder(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise XmxError(f"image folder {folder} does not exist")
    exts = {e.lower() for e in extensions}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in exts and p.is_file())


def embed_image_folder(store: FeatureStore, backbone, folder: str | os.PathLike, *,
                       extensions: Sequence[str] = IMAGE_EXTENSIONS, preset: str = "none", precision: str = "fp16",
                       decode: str = "auto", device=None, amp: str = "fp16", batch_size: int = 256,
                       num_workers: int | None = None, progress: bool = True, unreadable: str = "error",
                       skipped: list | None = None,
                       policy_key: str = "data.unreadable") -> tuple[torch.Tensor, list[str]]:
    """Embed every image under ``folder`` (e.g. the X-adapter retrieval index) through the store:
    ``(features [N, C] raw, relative paths [N])``. The key covers the listing with each file's size and mtime, so
    an added, removed or rewritten file makes a new entry. ``unreadable="skip"`` leaves unreadable files out of
    both (their names are appended to ``skipped``); ``error`` stops naming the first."""
    check_unreadable(unreadable)
    folder = Path(folder).expanduser().resolve()
    rel = list_image_folder(folder, extensions)
    if not rel:
        raise XmxError(f"image folder {folder} holds no images with extensions {', '.join(extensions)}")
    h = hashlib.sha256()
    for r in rel:
        st = (folder / r).stat()
        h.update(f"{r}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    device = _default_device(device)
    decode = resolve_decode(decode, device)
    key = image_feature_key(backbone, dataset="folder", split="all", subset_digest=h.hexdigest(), n=len(rel),
                            preset=preset, views=1, precision=precision, decode=decode, amp=amp,
                            device_type=device.type)

    def compute():
        bad: list = []
        out = {"features": extract_image_features(
            backbone, rel, folder, preset=preset, views=1, precision=precision, decode=decode, device=device,
            amp=amp, batch_size=batch_size, num_workers=num_workers, progress=progress, unreadable=unreadable,
            skipped=bad, policy_key=policy_key)[0]}
        if bad:
            out["skipped"] = torch.tensor([i for i, _ in bad], dtype=torch.long)
        return out

    entry = store.get_or_compute("image_features", key, compute)
    if "skipped" not in entry:
        return entry["features"], rel
    idx = entry["skipped"].tolist()
    if unreadable == "error":
        raise XmxError(unreadable_message(f"{folder / rel[idx[0]]} (no decoder reads it)", len(idx) - 1, policy_key))
    drop = set(idx)
    keep = [i for i in range(len(rel)) if i not in drop]
    if skipped is not None:
        skipped.extend(rel[i] for i in idx)
    return entry["features"][keep], [rel[i] for i in keep]
