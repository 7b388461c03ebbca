"""Safe image decoding: the one place in odsd-dist that turns member bytes into pixels.

Every failure is a `Damaged` with a quarantine reason (METHODS.md §1.1, docs/POOL.md): `empty`,
`not_image`, `truncated`, `bomb`, `no_image`, `unsupported` (and, from the readers, `bad_key` and
`duplicate_key`). The bytes decide the format (magic bytes; the member's extension is only a hint):
JPEG, PNG, WebP, GIF (first frame), BMP, TIFF (first page), ICO, PPM/PGM/PBM, QOI and JPEG 2000 are
decoded; other recognised formats are `unsupported`. A decompression bomb is refused from its header
(width x height against `max_pixels`, for every format) before any pixel is decoded; truncated files
are never padded.
"""
from __future__ import annotations

import io
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import (BmpImagePlugin, GifImagePlugin, IcoImagePlugin, Image, ImageFile, Jpeg2KImagePlugin,
                 JpegImagePlugin, PngImagePlugin, PpmImagePlugin, TiffImagePlugin, WebPImagePlugin)

from .keys import bad_key_detail, key_problem

# Member extensions tried first as the image of a sample, in this order; any other member whose bytes
# sniff as a decodable image is the image when none of these is present (pick_image).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "dib", "tif", "tiff", "ico", "ppm", "pgm", "pbm",
              "pnm", "qoi", "jp2", "j2k", "jpx", "jfif", "img")
# Members that are metadata, never an image, whatever their bytes (not sniffed).
META_EXTS = ("json", "txt", "cls", "cls2", "caption", "url", "parquet", "npy")
REASONS = ("truncated", "empty", "not_image", "bomb", "no_image", "unsupported", "bad_key", "duplicate_key")
DEFAULT_MAX_PIXELS = 50_000_000

# Header parsers, called directly (not via Image.open) so that PIL's own process-wide bomb guard
# (MAX_IMAGE_PIXELS: warns above ~89 MP, raises above ~179 MP) neither pre-empts nor overrides our
# configured `max_pixels` check, and stays in force, untouched, for any other code in the process.
# Only formats Pillow decodes itself, without an external program (EPS would run Ghostscript).
_OPENERS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile,
            "WEBP": WebPImagePlugin.WebPImageFile, "GIF": GifImagePlugin.GifImageFile,
            "BMP": BmpImagePlugin.BmpImageFile, "TIFF": TiffImagePlugin.TiffImageFile,
            "ICO": IcoImagePlugin.IcoImageFile, "PPM": PpmImagePlugin.PpmImageFile,
            "JPEG2000": Jpeg2KImagePlugin.Jpeg2KImageFile}
try:  # Pillow >= 9.5
    from PIL import QoiImagePlugin
    _OPENERS["QOI"] = QoiImagePlugin.QoiImageFile
except ImportError:  # pragma: no cover
    pass
_ALLOWED_FORMATS = tuple(_OPENERS)
# The usual file extension of each decoded format (odsd shards build --format keep).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
              "ICO": "ico", "PPM": "ppm", "JPEG2000": "jp2", "QOI": "qoi"}
_MAGIC = (  # (magic, format), checked in order after JPEG/PNG/WebP; CR2/PSD/EXR/EPS -> `unsupported`
    (b"II*\x00\x10\x00\x00\x00CR", "CR2"),  # a camera raw is a TIFF too: checked before TIFF, not decoded
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"qoif", "QOI"),
    (b"8BPS", "PSD"), (b"\x76\x2f\x31\x01", "EXR"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}
# EXIF orientation -> the transpose that shows the image upright (what browsers do).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# Truncated data must raise, never be padded with grey (PIL's default; enforced again on every decode).
ImageFile.LOAD_TRUNCATED_IMAGES = False
# PIL warns once per odd TIFF/EXIF block ("Corrupt EXIF data", "Tag data larger than file"): in a crawl that
# is a log line per image; the entry itself still decodes or is quarantined with its reason.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


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

    Keys are member suffixes ("jpg", "json", ...). A member with an IMAGE_EXTS extension wins, in
    IMAGE_EXTS order (case-insensitive), so a sample with both .jpg and .png yields the jpg. Otherwise
    the content decides: the first other member (sorted, META_EXTS left out) whose bytes sniff as an image.
    """
    lowered = {k.lower(): k for k in sample if isinstance(k, str) and not k.startswith("__")}
    for ext in IMAGE_EXTS:
        if ext in lowered:
            return ext, sample[lowered[ext]]
    for ext in sorted(lowered):
        if ext in META_EXTS:
            continue
        data = sample[lowered[ext]]
        if isinstance(data, (bytes, bytearray)) and sniff_format(data) is not None:
            return ext, data
    return None


def sniff_format(data: bytes) -> Optional[str]:
    """The image format named by the leading magic bytes: one of _OPENERS, another image format, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:1] == b"P" and data[1:2] in b"123456" and data[2:3] in b" \t\r\n":
        return "PPM"
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[data[8:12]]
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
        raise Damaged("unsupported", f".{ext}: {fmt} is not decoded (decoded: {'/'.join(_ALLOWED_FORMATS)})")
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


# reduced decoding stops at a DCT scale that leaves >= this many times the input size, so the final
# bilinear resize still filters (docs/BENCHMARKS.md, "Decoding at the size the teacher needs")
REDUCED_MARGIN = 2


def load_for_size(im: Image.Image, size: int, channels: int, reduced: bool = True) -> Image.Image:
    """Decode an opened image for a size x size input: pixels loaded (truncation raises here, never later).

    reduced: a JPEG at least 2 x REDUCED_MARGIN x size on both sides is decoded at the smallest DCT scale (1/2,
    1/4, 1/8; libjpeg's scaled IDCT, via Image.draft) that still leaves both sides >= REDUCED_MARGIN x size.
    Orientation and mode are the caller's (upright, to_mode)."""
    want = REDUCED_MARGIN * size
    if reduced and im.format == "JPEG" and min(im.size) >= 2 * want:
        im.draft("RGB" if channels == 3 else "L", (want, want))
    im.load()
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
        im = to_mode(upright(im), "RGB" if channels == 3 else "L")
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


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a camera JPEG shot sideways shows upright)."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is ignored, as viewers do
        return im
    op = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(op) if op is not None else im


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """`im` as 8-bit RGB or L. 16/32-bit grey keeps its range (scaled, not clipped at 255); palette
    images with transparency go through RGBA (PIL warns otherwise); alpha is dropped, as before."""
    if im.mode == mode:
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)
        else:
            a = a.astype(np.int64).clip(0, 65535) >> 8  # 16-bit samples (PNG/TIFF) -> their top 8 bits
        im = Image.fromarray(a.astype(np.uint8), "L")
        return im if mode == "L" else im.convert(mode)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    try:
        return im.convert(mode)
    except ValueError as e:  # a mode PIL cannot convert (e.g. LAB): recognised, not decoded
        raise Damaged("unsupported", f"{im.format or 'image'} mode {im.mode}: {e}") from None


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
    """Decode the image member of a WebDataset sample dict; a sample without one is Damaged('no_image'),
    one whose key is not a plain name (shards/keys.py) Damaged('bad_key')."""
    problem = key_problem(sample["__key__"]) if "__key__" in sample else None  # a plain dict has no key to check
    if problem is not None:
        members = [k for k in sample if not k.startswith("__")]
        raise Damaged("bad_key", bad_key_detail(str(sample["__key__"]), members, problem))
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
