"""Image feature extraction through a frozen CLIP image encoder, optionally cached in the :class:`FeatureStore`.

Files become normalised ``[3, S, S]`` inputs in :mod:`xmx.features.decode` (the preset transforms; the PIL path in
DataLoader workers, or the batched GPU decode, ``decode=pil|gpu|tensor|auto``); here they go through the encoder (under
autocast on CUDA), batch after batch, into a ``[V, N, C]`` tensor, and the results are keyed and cached.

Outputs are raw encoder features (docs/methods/shared.md#features) ``[V, N, C]`` in the store precision (fp16 or
fp32); with ``output="pre_projection"`` the features before the image encoder's final linear projection ``[V, N, D]``
(ProLIP trains that projection), stored as their own entry kind (:data:`OUTPUT_KINDS`) under the same key fields.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from xmx.data.images import check_unreadable, open_rgb  # noqa: F401 - open_rgb: the reader, offered here too
from xmx.errors import XmxError
from xmx.features.decode import (RATIO, RESIZE_MODES, JPEGBytes, PILViews, Preprocess, collate_bytes,  # noqa: F401
                                 collate_pil, decode_ahead, resolve_decode, transform_batch, unreadable_message)
from xmx.features.store import FeatureStore, tensors_checksum
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

EXTRACT_VERSION = 1  # bump when a change here changes the numbers: it is part of every feature key
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# what the encoder returns -> (store entry kind, the key's "output" field)
OUTPUT_KINDS = {"raw": ("image_features", "image_features_raw"),
                "pre_projection": ("image_features_preproj", "image_features_pre_projection")}


def check_output(output: str) -> str:
    if output not in OUTPUT_KINDS:
        raise XmxError(f"image feature output {output!r}; valid choices: {', '.join(OUTPUT_KINDS)}")
    return output


# ---- extraction ---------------------------------------------------------------------------------------------------
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
    decode = "pil" if preset == "augmix" else resolve_decode(decode, device)  # AugMix's ops are PIL's
    v_run = 1 if pp.deterministic else views  # identical views are encoded once and repeated
    per_batch = max(1, batch_size // v_run)
    if num_workers is None:
        num_workers = min(16 if decode == "gpu" else 8, max(0, (os.cpu_count() or 1) - 1))
    fast = decode in ("gpu", "tensor")
    ds = (JPEGBytes if fast else PILViews)(paths, pp, v_run)
    loader = DataLoader(ds, batch_size=per_batch, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_bytes if fast else collate_pil,
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

    batches = decode_ahead(loader, device, counts, paths=paths) if fast else ((b, None) for b in loader)
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
                x = transform_batch(batch, imgs, pp, device)  # [B*V,3,S,S] float on device
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
    decode = "pil" if preset == "augmix" else resolve_decode(decode, device)
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
