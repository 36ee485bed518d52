"""Street View image files: the four views of a location, one integrity check for files and uploads
(check_image), reduced-size decoding."""

import io
from pathlib import Path
from typing import BinaryIO

import simplejpeg
from PIL import Image

VIEWS = (0, 90, 180, 270)  # headings in degrees, the order of a quadruplet everywhere
N_VIEWS = len(VIEWS)
JPEG_EOI = b"\xff\xd9"
FORMATS = ("JPEG", "PNG", "WEBP")  # the allow-list: PIL never tries another plugin (EPS, TIFF, GIF, ...)
MIN_SIDE = 8
TOO_MANY_PIXELS = "too many pixels"  # how check_image's reason starts when the pixel cap is exceeded
NOT_AN_IMAGE = "not a readable image (JPEG, PNG or WebP expected)"


def view_paths(location_dir: str | Path) -> list[Path]:
    """The four view files of a location folder, in view order 0, 90, 180, 270."""
    return [Path(location_dir) / f"{view}.jpg" for view in VIEWS]


def check_image(source: str | Path | bytes, full_decode: bool = False, max_pixels: int | None = None) -> str | None:
    """None when `source` (a file path or a file's bytes) is a usable image, else a short reason.

    The fast check reads the header only, so no pixel is decoded: the format must be JPEG, PNG or WebP, each
    side at least 8 px, at most `max_pixels` pixels (None: PIL's bomb limit), and a JPEG must end with its
    end-of-image marker (truncated downloads). `full_decode` also decodes all the data strictly: a JPEG whose
    compressed data is damaged or cut short, which PIL would silently fill with gray, is refused.
    """
    if isinstance(source, (bytes, bytearray)):
        return _check(io.BytesIO(source), len(source), full_decode, max_pixels)
    try:
        size = Path(source).stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    try:
        with open(source, "rb") as handle:
            return _check(handle, size, full_decode, max_pixels)
    except OSError as error:  # a directory, no permission
        return f"not a readable image ({type(error).__name__})"


def image_header(handle: BinaryIO) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; only the allowed formats are tried."""
    image = Image.open(handle, formats=FORMATS)
    return image.format, image.width, image.height


def _check(handle: BinaryIO, size: int, full_decode: bool, max_pixels: int | None) -> str | None:
    if size == 0:
        return "empty file"
    try:
        kind, width, height = image_header(handle)
    except Image.DecompressionBombError:  # PIL's own limit, far over any sensible cap
        cap = min(2 * Image.MAX_IMAGE_PIXELS, max_pixels or 2 * Image.MAX_IMAGE_PIXELS)
        return f"{TOO_MANY_PIXELS} (over {cap / 1e6:g} megapixels)"
    except Exception:  # PIL raises many types for unknown formats and corrupt headers
        return NOT_AN_IMAGE
    if max_pixels is not None and width * height > max_pixels:
        return f"{TOO_MANY_PIXELS} ({width}x{height}, over {max_pixels / 1e6:g} megapixels)"
    if kind == "JPEG":
        handle.seek(max(0, size - 64))  # some encoders pad after EOI: look at the last bytes, not the last two
        if JPEG_EOI not in handle.read():
            return "truncated JPEG (no end-of-image marker)"
    if width < MIN_SIDE or height < MIN_SIDE:
        return f"too small ({width}x{height})"
    if full_decode:
        handle.seek(0)
        return decode_problem(handle.read(), kind)
    return None


def decode_problem(data: bytes, kind: str) -> str | None:
    """Why `data` (an image of format `kind` whose header checked out) does not decode cleanly, or None.

    JPEGs go through libjpeg-turbo in strict mode (simplejpeg), which turns its corrupt-data warnings (premature
    end of data segment, extraneous bytes before a marker, bad Huffman code) into errors; PIL ignores them. The
    entropy-coded data is read in full, the pixels at 1/8 scale in gray: only the check's cost.
    """
    if kind == "JPEG":
        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
            simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY",
                                   min_factor=8, strict=True)
        except ValueError:
            return "corrupt JPEG (its compressed data is damaged or cut short)"
        return None
    try:
        with Image.open(io.BytesIO(data), formats=(kind,)) as image:
            image.load()
    except Exception:  # truncated data, bad checksums
        return f"corrupt {kind} (its compressed data is damaged or cut short)"
    return None


def load_image(path: str | Path, image_size: int) -> Image.Image:
    """Decode `path` as an RGB image of image_size x image_size.

    JPEGs are decoded at reduced scale (libjpeg DCT scaling via PIL's draft mode: 1/2, 1/4, 1/8) to
    the smallest size still >= image_size, so a 640x640 file is never fully decoded for a 224 input.
    """
    with Image.open(path, formats=FORMATS) as image:
        if image.format == "JPEG":
            image.draft("RGB", (image_size, image_size))
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
        return image


def decode_checked(data: bytes, image_size: int, max_pixels: int | None = None) -> Image.Image | str:
    """An uploaded file decoded as load_image does, after the header check and, for a JPEG, the strict decode
    (check_image's full_decode); the reason instead when it is unusable. A PNG or WebP is decoded once: PIL's own
    decoder refuses truncated or damaged data. Imports nothing heavy, so a worker process can run it."""
    reason = check_image(data, max_pixels=max_pixels)
    if reason is not None:
        return reason
    kind = image_header(io.BytesIO(data))[0]
    if kind == "JPEG" and (reason := decode_problem(data, kind)) is not None:
        return reason
    try:
        return load_image(io.BytesIO(data), image_size)
    except Exception:  # truncated data, bad checksums
        return f"corrupt {kind} (its compressed data is damaged or cut short)"
