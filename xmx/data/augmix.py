"""AugMix views as TPT's and TDA's releases draw them (``data/datautils.py`` / ``datasets/utils.py`` ``augmix``, ops
from ``augmix_ops.py``, Hendrycks et al.'s AugMix ops at severity 1), with a seeded generator instead of numpy's
global one:

    x0 = RandomResizedCrop(S) + flip of the image (the caller's geometry)
    mix = sum_{i<3} w_i pre(chain_i(x0)),  chain_i = 1-3 ops drawn from the 9 below,  w ~ Dir(1,1,1)
    view = m pre(x0) + (1 - m) mix,  m ~ Beta(1,1)        (pre: ToTensor + Normalize)

torchvision's ``AugMix`` mixes differently (uint8, its own op set and levels), so the release's form is kept here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def _level(rng, severity: float) -> float:
    return rng.uniform(low=0.1, high=severity)


def _int(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def _float(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def _autocontrast(img, rng, sev, size):
    return ImageOps.autocontrast(img)


def _equalize(img, rng, sev, size):
    return ImageOps.equalize(img)


def _posterize(img, rng, sev, size):
    return ImageOps.posterize(img, 4 - _int(_level(rng, sev), 4))


def _rotate(img, rng, sev, size):
    deg = _int(_level(rng, sev), 30)
    return img.rotate(-deg if rng.uniform() > 0.5 else deg, resample=Image.BILINEAR)


def _solarize(img, rng, sev, size):
    return ImageOps.solarize(img, 256 - _int(_level(rng, sev), 256))


def _affine(coeffs_of):
    def op(img, rng, sev, size):
        return img.transform((size, size), Image.AFFINE, coeffs_of(rng, sev, size), resample=Image.BILINEAR)
    return op


def _signed(v, rng):
    return -v if rng.uniform() > 0.5 else v


_shear_x = _affine(lambda r, s, n: (1, _signed(_float(_level(r, s), 0.3), r), 0, 0, 1, 0))
_shear_y = _affine(lambda r, s, n: (1, 0, 0, _signed(_float(_level(r, s), 0.3), r), 1, 0))
_translate_x = _affine(lambda r, s, n: (1, 0, _signed(_int(_level(r, s), n / 3), r), 0, 1, 0))
_translate_y = _affine(lambda r, s, n: (1, 0, 0, 0, 1, _signed(_int(_level(r, s), n / 3), r)))

OPS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x, _translate_y)


def augmix_view(x0: Image.Image, pre, rng: np.random.Generator, severity: float = 1.0, width: int = 3):
    """``x0``: the cropped/flipped PIL image; ``pre``: PIL -> normalised tensor; -> the mixed view (tensor)."""
    size = x0.size[0]
    x = pre(x0)
    w = np.float32(rng.dirichlet([1.0] * width))
    m = float(np.float32(rng.beta(1.0, 1.0)))
    mix = x.new_zeros(x.shape)
    for i in range(width):
        aug = x0.copy()
        for _ in range(int(rng.integers(1, 4))):
            aug = OPS[int(rng.integers(len(OPS)))](aug, rng, severity, size)
        mix += float(w[i]) * pre(aug)
    return m * x + (1 - m) * mix
