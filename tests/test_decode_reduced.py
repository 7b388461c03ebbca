"""Decoding at the size the teacher needs: JPEG scaled IDCT (Image.draft) then a filtered resize, EXIF
orientation, modes (CMYK, P, LA, I;16), and the damage reasons with it on and off."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from odsd_dist.shards.decode import Damaged, decode_image, load_for_size, open_image


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients plus low-frequency waves), like a photo rather than noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = [127 + 100 * np.sin(x / w * rng.uniform(2, 6) + c) * np.cos(y / h * rng.uniform(2, 6) - c) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_reduced_jpeg_decodes_at_a_dct_scale_and_matches_the_full_decode():
    data = _save(Image.fromarray(_photo(640, 480)), "JPEG", quality=90)
    im = load_for_size(open_image(data, "jpg", load=False), 32, 3, reduced=True)
    assert im.size == (160, 120)  # 1/4: the smallest scale with both sides >= 2 x 32 (REDUCED_MARGIN)
    assert load_for_size(open_image(data, "jpg", load=False), 16, 3, reduced=True).size == (80, 60)  # 1/8
    assert load_for_size(open_image(data, "jpg", load=False), 32, 3, reduced=False).size == (640, 480)
    assert load_for_size(open_image(data, "jpg", load=False), 128, 3, reduced=True).size == (640, 480)  # < 4x: full
    a = decode_image(data, "jpg", 32, reduced=True).astype(np.int16)
    b = decode_image(data, "jpg", 32, reduced=False).astype(np.int16)
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a - b).mean() < 3 and np.abs(a - b).max() < 40
    assert decode_image(data, "jpg", 32, channels=1, reduced=True).shape == (32, 32, 1)


@pytest.mark.parametrize("reduced", [True, False])
def test_exif_orientation_is_applied(reduced):
    arr = _photo(480, 320, seed=1)
    plain = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels must be turned 90 degrees clockwise to display
    rotated = _save(plain.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    upright = _save(plain, "JPEG", quality=95)
    a = decode_image(rotated, "jpg", 64, reduced=reduced).astype(np.int16)
    b = decode_image(upright, "jpg", 64, reduced=reduced).astype(np.int16)
    assert np.abs(a - b).mean() < 4  # upright after decoding
    wrong = decode_image(_save(plain.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95), "jpg", 64,
                         reduced=reduced).astype(np.int16)
    assert np.abs(wrong - b).mean() > 20  # the check can tell a turned image


@pytest.mark.parametrize("reduced", [True, False])
def test_modes_come_out_as_rgb(reduced):
    rgb = Image.fromarray(_photo(300, 200, seed=2))
    ref = decode_image(_save(rgb, "PNG"), "png", 32).astype(np.int16)
    cmyk = decode_image(_save(rgb.convert("CMYK"), "JPEG", quality=95), "jpg", 32, reduced=reduced).astype(np.int16)
    assert np.abs(cmyk - ref).mean() < 6
    pal = decode_image(_save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "png", 32, reduced=reduced)
    assert np.abs(pal.astype(np.int16) - ref).mean() < 10
    grey = np.asarray(rgb.convert("L"))
    la = decode_image(_save(rgb.convert("LA"), "PNG"), "png", 32, reduced=reduced)
    g32 = decode_image(_save(Image.fromarray(grey), "PNG"), "png", 32, reduced=reduced)
    assert (la == g32).all() and (la[..., 0] == la[..., 1]).all()
    i16 = decode_image(_save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), "png", 32, reduced=reduced)
    assert np.abs(i16.astype(np.int16) - g32).max() <= 1  # 16-bit grey scaled to 8 bits, not clipped to white
    grey_jpeg = decode_image(_save(Image.fromarray(grey), "JPEG", quality=95), "jpg", 32, reduced=reduced)
    assert np.abs(grey_jpeg.astype(np.int16) - g32).mean() < 3


@pytest.mark.parametrize("reduced", [True, False])
def test_damage_reasons_unchanged(reduced):
    data = _save(Image.fromarray(_photo(640, 480)), "JPEG", quality=90)
    with pytest.raises(Damaged) as e:
        decode_image(data[: len(data) // 2], "jpg", 32, reduced=reduced)
    assert e.value.reason == "truncated"
    with pytest.raises(Damaged) as e:
        decode_image(data, "jpg", 32, max_pixels=640 * 480 - 1, reduced=reduced)
    assert e.value.reason == "bomb"
