"""Safe image decoding: the one place in odsd-dist that turns member bytes into pixels.

Every failure is a `Damaged` with a quarantine reason (METHODS.md §1.1): `empty`, `not_image`,
`truncated`, `bomb`, `no_image`, `unsupported`. A decompression bomb is refused from its header
(width x height against `max_pixels`) before any pixel is decoded; truncated files are never padded.
"""
from __future__ import annotations

import io
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REASONS = ("truncated", "empty", "not_image", "bomb", "no_image", "unsupported")
DEFAULT_MAX_PIXELS = 50_000_000

# PIL formats we decode, and the magic bytes that identify them (sniffed before PIL sees the bytes).
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
_OTHER_IMAGE_MAGIC = (  # recognised image formats we refuse -> `unsupported`
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"), (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "EXR"),
)

# Header parsers, called directly (not via Image.open) so that PIL's own process-wide bomb guard
# (MAX_IMAGE_PIXELS: warns above ~89 MP, raises above ~179 MP) neither pre-empts nor overrides our
# configured `max_pixels` check, and stays in force, untouched, for any other code in the process.
_OPENERS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile,
            "WEBP": WebPImagePlugin.WebPImageFile}
# Truncated data must raise, never be padded with grey (PIL's default; enforced again on every decode).
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Damaged(Exception):
    """An entry that cannot be decoded; `reason` is a quarantine reason, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    def __reduce__(self):  # picklable across Ray/multiprocessing boundaries
        return (Damaged, (self.reason, self.detail))


def pick_image(sample: dict) -> Optional[tuple[str, Optional[bytes]]]:
    """The (extension, bytes) of a WebDataset sample's image member, or None if it has none.

    Keys are member suffixes ("jpg", "json", ...); extensions are matched case-insensitively in
    IMAGE_EXTS order, so a sample with both .jpg and .png yields the jpg.
    """
    lowered = {k.lower(): k for k in sample if isinstance(k, str) and not k.startswith("__")}
    for ext in IMAGE_EXTS:
        if ext in lowered:
            return ext, sample[lowered[ext]]
    return None


def sniff_format(data: bytes) -> Optional[str]:
    """The image format named by the leading magic bytes: 'JPEG', 'PNG', 'WEBP', another format, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _OTHER_IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    return None


def open_image(data: Optional[bytes], ext: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               load: bool = True) -> Image.Image:
    """A checked PIL image: header read, bomb refused, and (load=True) fully decoded; raises Damaged."""
    if data is None:
        raise Damaged("no_image", "no image member")
    if len(data) == 0:
        raise Damaged("empty", f".{ext}: 0 bytes")
    im = _open_checked(bytes(data), ext, max_pixels)
    if load:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        except Exception as e:
            raise Damaged("truncated", f"{im.format} decode failed: {type(e).__name__}: {e}") from None
    return im


def _open_checked(data: bytes, ext: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse bombs; raises Damaged."""
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:16].decode("latin-1").encode("unicode_escape").decode()
        raise Damaged("not_image", f".{ext}: no known image signature (starts {head!r})")
    if fmt not in _ALLOWED_FORMATS:
        raise Damaged("unsupported", f".{ext}: {fmt} is not one of {'/'.join(_ALLOWED_FORMATS)}")
    try:
        im = _OPENERS[fmt](io.BytesIO(data))  # reads the header only; pixels stay undecoded
    except Exception as e:  # signature says `fmt` but the header is cut or corrupt
        raise Damaged("truncated", f"{fmt} header unreadable: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Damaged("truncated", f"{fmt} header declares {w}x{h}")
    if w * h > max_pixels:
        raise Damaged("bomb", f"{fmt} header declares {w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,}")
    return im


def load_for_size(im: Image.Image, size: int, channels: int, reduced: bool = True) -> Image.Image:
    """Decode an opened image for a size x size input: pixels loaded, EXIF orientation applied, 16-bit grey
    brought to 8 bits (PIL's convert would clip it to white). Truncation raises here, never later.

    reduced: a JPEG at least 2x size on both sides is decoded at the smallest DCT scale (1/2, 1/4, 1/8; libjpeg's
    scaled IDCT, via Image.draft) that still leaves both sides >= size, so only a < 2x resize is left to do."""
    if reduced and im.format == "JPEG" and min(im.size) >= 2 * size:
        im.draft("RGB" if channels == 3 else "L", (size, size))
    im.load()
    if im.getexif().get(0x0112, 1) != 1:  # Orientation tag
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    return im


def decode_image(data: Optional[bytes], ext: str, size: int, channels: int = 3,
                 max_pixels: int = DEFAULT_MAX_PIXELS, reduced: bool = True) -> np.ndarray:
    """Decode one image member to a uint8 array of shape (size, size, channels); raises Damaged.

    Grey images become RGB (channels=3) and colour images L (channels=1). Resizing is PIL bilinear,
    which antialiases when shrinking. Pure (bar re-asserting LOAD_TRUNCATED_IMAGES=False), thread-safe.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    im = open_image(data, ext, max_pixels, load=False)
    fmt = im.format
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the process-wide switch: never pad
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = load_for_size(im, size, channels, reduced)
        im = im.convert("RGB" if channels == 3 else "L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    except Damaged:
        raise
    except Exception as e:
        raise Damaged("truncated", f"{fmt} decode failed: {type(e).__name__}: {e}") from None
    if channels == 1:
        arr = arr[:, :, None]
    return arr


def decode_batch(items: Sequence[Optional[tuple[str, Optional[bytes]]]], size: int, channels: int = 3,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[int], list[tuple[int, Damaged]]]:
    """Decode many (ext, bytes) items (None = no image member) into one array.

    Returns (images uint8 (n_ok, size, size, channels), indices of the decoded items, [(index, Damaged)]).
    """
    out = np.empty((len(items), size, size, channels), dtype=np.uint8)
    ok: list[int] = []
    bad: list[tuple[int, Damaged]] = []
    for i, item in enumerate(items):
        try:
            if item is None:
                raise Damaged("no_image", "no image member")
            out[len(ok)] = decode_image(item[1], item[0], size, channels, max_pixels)
            ok.append(i)
        except Damaged as d:
            bad.append((i, d))
    return out[: len(ok)], ok, bad


def decode_sample(sample: dict, size: int, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the image member of a WebDataset sample dict; a sample without one is Damaged('no_image')."""
    picked = pick_image(sample)
    if picked is None:
        exts = sorted(k for k in sample if not k.startswith("__"))
        raise Damaged("no_image", f"members: {', '.join(exts) or 'none'}")
    return decode_image(picked[1], picked[0], size, channels, max_pixels)


def count_reasons(errors: Iterable[Damaged]) -> dict[str, int]:
    """{reason: count} over Damaged errors, in REASONS order."""
    counts = {r: 0 for r in REASONS}
    for e in errors:
        counts[e.reason] = counts.get(e.reason, 0) + 1
    return {r: n for r, n in counts.items() if n}
