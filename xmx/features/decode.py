"""Image decoding and preprocessing for the frozen image encoder: the transform (:class:`Preprocess`), the datasets
that run in DataLoader workers, and the batched GPU decode. :mod:`xmx.features.extract` (features through the encoder)
and :mod:`xmx.features.online` (training on images) build on it.

Two ways to turn files into normalised ``[3, S, S]`` inputs, both with the same transforms
(docs/methods/shared.md#image-preprocessing):

- ``decode="pil"`` (reference, CPU): PIL decodes in DataLoader workers (``.convert("RGB")`` handles CMYK, greyscale
  and PNG files named ``.jpg``), torchvision's functional transforms resize/crop the PIL image (:class:`PILViews`).
- ``decode="gpu"`` (fast path; ``decode="tensor"`` runs the same code on the CPU, for tests): workers only read
  file bytes (and the JPEG header, for the crop parameters: :class:`JPEGBytes`);
  ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes a batch with nvjpeg (:func:`decode_batch`), and the same
  functional transforms resize/crop the uint8 tensors on the GPU (:func:`transform_batch`). Files that are not
  RGB/greyscale JPEGs (PNG, CMYK, ...) or that nvjpeg rejects are decoded by PIL and then follow the same tensor ops.
  Without CUDA, ``decode="gpu"`` falls back to ``"pil"`` (:func:`resolve_decode`).

Presets: ``none`` = the backbone's eval transform (its ``resize_mode``: ``shortest`` = resize the short side to S and
centre crop S, as OpenAI's CLIP; ``squash`` = resize to S x S ignoring the aspect ratio, as SigLIP, DFN and PE;
``longest`` = resize the long side to S and pad to S x S with zeros; with the backbone's interpolation); ``tip`` =
RandomResizedCrop(S, scale (0.5, 1), bicubic) + horizontal flip; ``coop`` = the same with scale (0.08, 1). CLIP
mean/std normalisation always; optional Gaussian noise ``noise_std`` added to the normalised image. Every random draw
of view ``v`` of item ``i`` comes from a generator seeded by ``(seed, v, i)``, so the result does not depend on worker
count or batch size, and both decode paths use the very same crops, flips and noise.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from xmx.backbones.weights import RESIZE_MODES  # the one list of resize modes (open_clip's names)
from xmx.data.images import open_rgb
from xmx.data.transforms import PRESET_INTERPOLATION, PRESETS  # preset -> RandomResizedCrop scale (None: eval)
from xmx.errors import XmxError

log = logging.getLogger(__name__)

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
_JPEG_MAGIC = b"\xff\xd8\xff"


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
        return InterpolationMode(PRESET_INTERPOLATION.get(self.preset, self.interpolation))

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
        crop = self.geometry(img, self.view_params(index, view, img.height, img.width))
        if self.preset == "augmix":  # the releases' AugMix mixing on the crop (xmx.data.augmix), seeded per view
            import numpy as np
            from xmx.data.augmix import augmix_view
            rng = np.random.default_rng(_seed(self.seed, view, index, "augmix"))
            x = augmix_view(crop, lambda im: self.normalise(TF.pil_to_tensor(im)), rng)
        else:
            x = self.normalise(TF.pil_to_tensor(crop))
        n = self.noise(index, view)
        return x if n is None else x + n

    def tensor_view(self, img: torch.Tensor, index: int, view: int) -> torch.Tensor:
        """uint8 [3,H,W] (any device) -> normalised float [3,S,S] (+ noise): what the GPU path does per image."""
        x = self.normalise(self.geometry(img, self.view_params(index, view, img.shape[-2], img.shape[-1])))
        n = self.noise(index, view)
        return x if n is None else x + n.to(x.device)


def error_line(path, e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{path}: {type(e).__name__}: {text}"


def unreadable_message(first: str, more: int = 0, key: str = "data.unreadable") -> str:
    return (f"cannot read image {first}" + (f" (+{more} more)" if more else "")
            + f"; replace the file, or set {key}=skip to leave such files out")


# ---- datasets run in DataLoader workers ---------------------------------------------------------------------------
class PILViews(Dataset):
    """item i -> {"index", "x": normalised [V,3,S,S]} or {"index", "error"}."""

    def __init__(self, paths: Sequence[str], pp: Preprocess, views: int):
        self.paths, self.pp, self.views = paths, pp, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = open_rgb(self.paths[i])
        except Exception as e:  # noqa: BLE001 - reported as one line by the main process
            return {"index": i, "error": error_line(self.paths[i], e)}
        return {"index": i, "x": torch.stack([self.pp.pil_view(img, i, v) for v in range(self.views)])}


def _errors(items) -> list[tuple[int, str]]:
    return [(it["index"], it["error"]) for it in items if "error" in it]


def collate_pil(items):
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


class JPEGBytes(Dataset):
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
            return {"index": i, "error": error_line(path, e)}
        noise = [self.pp.noise(i, v) for v in range(self.views)]
        return {"index": i, "data": data, "image": image,
                "params": [self.pp.view_params(i, v, height, width) for v in range(self.views)],
                "noise": None if noise[0] is None else torch.stack(noise).half()}  # [V,3,S,S], fp16 halves IPC


def collate_bytes(items):
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


def gpu_decode(blobs: list[torch.Tensor], device: torch.device) -> list:
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


def decode_batch(batch: dict, device: torch.device, counts: dict, paths: Sequence[str] = ()) -> list[torch.Tensor]:
    """A collated byte batch -> its images, uint8 [3,H,W] each: JPEGs decoded on ``device`` in one batched call
    (nvjpeg on CUDA), the PIL-decoded fallbacks moved there."""
    offsets, blob = batch["offsets"], batch["blob"]
    jpeg_pos = [k for k, im in enumerate(batch["images"]) if im is None]
    decoded = gpu_decode([blob[offsets[k]:offsets[k + 1]] for k in jpeg_pos], device) if jpeg_pos else []
    imgs = list(batch["images"])
    for k, im in zip(jpeg_pos, decoded):
        imgs[k] = im
    bad = [k for k, im in enumerate(imgs) if isinstance(im, BaseException)]
    if bad:  # a body that no decoder reads (truncated, garbage after a valid header): out of the batch, as errors
        for k in bad:
            i = int(batch["index"][k])
            batch["errors"].append((i, error_line(paths[i] if i < len(paths) else f"image #{i}", imgs[k])))
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


def transform_batch(batch: dict, imgs: list[torch.Tensor], pp: Preprocess, device: torch.device) -> torch.Tensor:
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


def decode_ahead(loader, device: torch.device, counts: dict, depth: int = 2, paths: Sequence[str] = ()):
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
                if not put((batch, decode_batch(batch, device, counts, paths) if len(batch["index"]) else [])):
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
