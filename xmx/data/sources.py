"""Where ``python -m xmx.data get`` fetches each CoOp dataset from, in the order it tries them.

Each dataset has a list of :class:`Recipe` (a source: the files to download and how their unpacked contents become
CoOp's ``$DATA/<dir>/`` folder), tried first to last until one gives a tree that passes verification:

1. ``hub``: Hugging Face Hub repositories that mirror CoOp's layout. ``zhengli97/prompt_learning_dataset`` (a model
   repository, PromptKD's authors) holds one zip per CoOp dataset except ImageNet; its file names and the pinned
   revision are those PromptKD's documentation links to (``HUB_REVISION``). ImageNet-V2 and ImageNet-Sketch come from
   the dataset repositories their authors publish on the Hub.
2. ``torchvision``: the URLs and md5 sums torchvision's own dataset classes download (read from torchvision at run
   time, so they follow the installed version), where those sources still answer.
3. ``original``: the authors' URLs, and CoOp's Google Drive split files (through torchvision's Google Drive helper,
   which needs ``gdown``).

Checksums: a ``url`` file is checked against the md5 / sha256 its source publishes (torchvision's, or pinned here);
a ``hub`` file against the sha256 the Hub publishes for it (its LFS object id, the ``ETag`` of the download) and a
pinned sha256 where one is given. Every default host is real: tests point ``HF_ENDPOINT`` and ``XMX_DATA_MIRROR`` at
a loopback server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

HUB_REPO = "zhengli97/prompt_learning_dataset"
HUB_REVISION = "ceb3112337fb6e1bf71534e355ca5569b63f19a6"
"""The revision PromptKD's asset list pins (its scripts link ``.../resolve/<this>/<zip>``)."""


@dataclass(frozen=True)
class Remote:
    """One downloadable file. ``kind``: ``hub`` (``repo``/``path`` at ``revision``, through ``hf_hub_download``),
    ``url`` (plain HTTP(S), resumable), ``gdrive`` (Google Drive ``file_id``, through torchvision + gdown).
    ``unpack``: the staging sub-folder the archive is extracted into (``"."`` = the staging root); ``None`` copies
    the file as it is to ``dest`` (relative to the dataset folder)."""
    kind: str
    name: str
    url: str = ""
    repo: str = ""
    repo_type: str = "model"
    revision: str = "main"
    path: str = ""
    file_id: str = ""
    md5: str | None = None
    sha256: str | None = None
    unpack: str | None = "."
    dest: str = ""

    def describe(self) -> str:
        if self.kind == "hub":
            kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
            return f"{os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}/{kind}{self.repo}/resolve/{self.revision}/{self.path}"
        if self.kind == "gdrive":
            return f"https://drive.google.com/file/d/{self.file_id}"
        return self.url


@dataclass(frozen=True)
class Recipe:
    """One source of one dataset: its files, then ``root`` (the path inside the staging folder that becomes
    ``$DATA/<dir>/``; ``None``: the shallowest folder holding the dataset's marker), archives inside that folder to
    unpack in place (``nested``) and renames inside it (``moves``)."""
    kind: str  # hub | torchvision | original
    files: tuple[Remote, ...]
    root: str | None = None
    nested: tuple[str, ...] = ()
    moves: tuple[tuple[str, str], ...] = ()
    note: str = ""

    @property
    def label(self) -> str:
        f = self.files[0]
        if f.kind == "hub":
            return f"hub:{f.repo}@{f.revision[:12]}"
        return f"{self.kind}:{f.describe()}"


@dataclass(frozen=True)
class DatasetSources:
    recipes: tuple[Recipe, ...]
    manual: str  # what to download by hand and where to put it
    extra: dict = field(default_factory=dict)


def _hub_zip(name: str) -> Recipe:
    return Recipe("hub", (Remote("hub", name, repo=HUB_REPO, revision=HUB_REVISION, path=name),))


def _tv(cls: str, attr_url: str, attr_md5: str | None = None, index: int | None = None):
    """(url, md5) from a torchvision dataset class attribute, so the catalog follows the installed torchvision."""
    import torchvision.datasets as tvd
    c = getattr(tvd, cls)
    if index is not None:
        return getattr(c, attr_url)[index]
    return getattr(c, attr_url), (getattr(c, attr_md5) if attr_md5 else None)


def _url(url: str, md5: str | None = None, sha256: str | None = None, **kw) -> Remote:
    return Remote("url", url.rstrip("/").rsplit("/", 1)[-1], url=url, md5=md5, sha256=sha256, **kw)


def _split_gdrive(file_id: str, fname: str) -> Remote:
    return Remote("gdrive", fname, file_id=file_id, unpack=None, dest=fname)


def catalog() -> dict[str, DatasetSources]:
    """The sources of every dataset ``get`` knows, in fallback order (built on call: torchvision is read lazily)."""
    dtd_url, dtd_md5 = _tv("DTD", "_URL", "_MD5")
    food_url, food_md5 = _tv("Food101", "_URL", "_MD5")
    sun_url, sun_md5 = _tv("SUN397", "_DATASET_URL", "_DATASET_MD5")
    pets_url, pets_md5 = _tv("OxfordIIITPet", "_RESOURCES", index=0)
    import torchvision.datasets as tvd
    fl_name, fl_md5 = tvd.Flowers102._file_dict["image"]
    fl_url = tvd.Flowers102._download_url_prefix + fl_name
    air_url = tvd.FGVCAircraft._URL
    # EuroSAT and Caltech101: torchvision passes these literals inside download(); kept in step with 0.29.
    euro_url, euro_md5 = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                          "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", "c8fa014336c82ac7804f0398fcb19387")
    cal_url, cal_md5 = ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                        "3138e1922a9193bfa496528edbbc45d0")
    # CoOp's split files for the two datasets xmx does not ship, on CoOp's Google Drive (DATASETS.md).
    food_split = _split_gdrive("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "split_zhou_Food101.json")
    sun_split = _split_gdrive("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", "split_zhou_SUN397.json")
    hub_hint = f"https://huggingface.co/{HUB_REPO}/tree/{HUB_REVISION}"
    cat = {
        "caltech101": DatasetSources(
            (_hub_zip("caltech-101.zip"),
             Recipe("torchvision", (_url(cal_url, cal_md5),), root="caltech-101",
                    nested=("101_ObjectCategories.tar.gz",))),
            f"caltech-101.zip from {hub_hint}, unzipped so that $DATA/caltech-101/101_ObjectCategories/<class>/ exists"),
        "oxford_pets": DatasetSources(
            (_hub_zip("oxford_pets.zip"), Recipe("torchvision", (_url(pets_url, pets_md5),), root=".")),
            f"oxford_pets.zip from {hub_hint} (or images.tar.gz from {pets_url}) so that $DATA/oxford_pets/images/ "
            "exists"),
        "stanford_cars": DatasetSources(
            (_hub_zip("stanford_cars.zip"),),
            f"stanford_cars.zip from {hub_hint} so that $DATA/stanford_cars/{{cars_train,cars_test}}/ exist (the "
            "original Stanford URLs are dead)"),
        "oxford_flowers": DatasetSources(
            (_hub_zip("oxford_flowers.zip"), Recipe("torchvision", (_url(fl_url, fl_md5),), root=".")),
            f"oxford_flowers.zip from {hub_hint} (or {fl_url}) so that $DATA/oxford_flowers/jpg/ exists"),
        "food101": DatasetSources(
            (_hub_zip("food101.zip"),
             Recipe("torchvision", (_url(food_url, food_md5), food_split), root="food-101")),
            f"food101.zip from {hub_hint} (or {food_url} + CoOp's split_zhou_Food101.json) so that "
            "$DATA/food-101/images/ and $DATA/food-101/split_zhou_Food101.json exist"),
        "fgvc_aircraft": DatasetSources(
            (_hub_zip("fgvc_aircraft.zip"),
             Recipe("torchvision", (_url(air_url),), root="fgvc-aircraft-2013b/data")),
            f"fgvc_aircraft.zip from {hub_hint} (or the data/ folder of {air_url}) so that "
            "$DATA/fgvc_aircraft/{images/,variants.txt,images_variant_*.txt} exist"),
        "sun397": DatasetSources(
            (_hub_zip("sun397.zip"), Recipe("torchvision", (_url(sun_url, sun_md5), sun_split), root=".")),
            f"sun397.zip from {hub_hint} (or {sun_url} + CoOp's split_zhou_SUN397.json) so that "
            "$DATA/sun397/SUN397/ and $DATA/sun397/split_zhou_SUN397.json exist"),
        "dtd": DatasetSources(
            (_hub_zip("dtd.zip"), Recipe("torchvision", (_url(dtd_url, dtd_md5),), root="dtd")),
            f"dtd.zip from {hub_hint} (or {dtd_url}) so that $DATA/dtd/images/<class>/ exists"),
        "eurosat": DatasetSources(
            (_hub_zip("eurosat.zip"), Recipe("torchvision", (_url(euro_url, euro_md5),), root=".")),
            f"eurosat.zip from {hub_hint} (or {euro_url}) so that $DATA/eurosat/2750/<class>/ exists"),
        "ucf101": DatasetSources(
            (_hub_zip("ucf101.zip"),
             Recipe("original", (Remote("gdrive", "UCF-101-midframes.zip", file_id="10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),),
                    root=".")),
            f"ucf101.zip from {hub_hint} (or CoOp's UCF-101-midframes.zip) so that $DATA/ucf101/UCF-101-midframes/ "
            "exists"),
        "imagenet_v2": DatasetSources(
            (Recipe("hub", (Remote("hub", "imagenetv2-matched-frequency.tar.gz", repo="vaishaal/ImageNetV2",
                                   repo_type="dataset", revision="main",
                                   path="imagenetv2-matched-frequency.tar.gz"),), root="."),
             Recipe("original", (_url("https://s3-us-west-2.amazonaws.com/imagenetv2public/"
                                      "imagenetv2-matched-frequency.tar.gz"),), root=".")),
            "imagenetv2-matched-frequency.tar.gz from https://huggingface.co/datasets/vaishaal/ImageNetV2, unpacked "
            "so that $DATA/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/ exists"),
        "imagenet_sketch": DatasetSources(
            (Recipe("hub", (Remote("hub", "ImageNet-Sketch.zip", repo="songweig/imagenet_sketch", repo_type="dataset",
                                   revision="main", path="data/ImageNet-Sketch.zip"),),
                    root=".", moves=(("sketch", "images"),)),),
            "data/ImageNet-Sketch.zip from https://huggingface.co/datasets/songweig/imagenet_sketch, unzipped and "
            "its sketch/ folder renamed so that $DATA/imagenet-sketch/images/<wnid>/ exists"),
        "imagenet_a": DatasetSources(
            (Recipe("original", (_url("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"),), root="."),),
            "imagenet-a.tar from https://github.com/hendrycks/natural-adv-examples, unpacked so that "
            "$DATA/imagenet-adversarial/imagenet-a/<wnid>/ exists"),
        "imagenet_r": DatasetSources(
            (Recipe("original", (_url("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),), root="."),),
            "imagenet-r.tar from https://github.com/hendrycks/imagenet-r, unpacked so that "
            "$DATA/imagenet-rendition/imagenet-r/<wnid>/ exists"),
    }
    return {k: _mirrored(v) for k, v in cat.items()}


def _mirrored(ds: DatasetSources) -> DatasetSources:
    """``XMX_DATA_MIRROR=<base url>``: every ``url`` file is fetched from ``<base>/<host>/<path>`` instead (a local
    mirror; the tests' loopback server). Hub files follow ``HF_ENDPOINT``."""
    base = os.environ.get("XMX_DATA_MIRROR")
    if not base:
        return ds
    from urllib.parse import urlsplit

    def move(f: Remote) -> Remote:
        if f.kind != "url":
            return f
        u = urlsplit(f.url)
        return replace(f, url=f"{base.rstrip('/')}/{u.netloc}{u.path}")
    return replace(ds, recipes=tuple(replace(r, files=tuple(move(f) for f in r.files)) for r in ds.recipes))


IMAGENET_HELP = """\
imagenet: ImageNet-1k (ILSVRC2012) cannot be redistributed, so xmx does not download it.
  1. Sign in at https://image-net.org/download-images.php and download, for ILSVRC2012:
     ILSVRC2012_img_train.tar (138 GB), ILSVRC2012_img_val.tar (6.3 GB), ILSVRC2012_devkit_t12.tar.gz (2.5 MB).
  2. python -m xmx.data get imagenet --root {root} --from <folder with the three files>
     builds {root}/imagenet/images/{{train,val}}/<wnid>/ and classnames.txt (validation labels from the devkit)."""
