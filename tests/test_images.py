"""check_image, the one image validator of files (ingest, predict, downloads) and uploads (the server): real
images encoded by PIL, then damaged the ways the server was probed with."""

import io

import numpy as np
import pytest
from PIL import Image

from src.data.images import NOT_AN_IMAGE, TOO_MANY_PIXELS, check_image


def encode(image: Image.Image, kind: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def photo(size: int = 256, seed: int = 0) -> Image.Image:
    """Gradients plus noise: compresses like a photo (a flat image leaves too little data to damage)."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([(x * 0.7 + y * 0.2) % 256, (y * 0.9) % 256, (x * y / 300) % 256], -1)
    pixels += np.random.default_rng(seed).normal(0, 20, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` whose frame header (SOF0/SOF2) claims another size; the compressed data stays that of the original."""
    data = bytearray(jpeg)
    sof = next(i for i in range(2, len(data)) if data[i - 1] == 0xFF and data[i] in (0xC0, 0xC2))
    data[sof + 4:sof + 8] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def zeroed_middle(data: bytes) -> bytes:
    n = len(data)
    return data[:n // 4] + bytes(n // 2) + data[n // 4 + n // 2:]


GOOD = {
    "baseline JPEG": lambda: encode(photo()),
    "progressive JPEG": lambda: encode(photo(), progressive=True),
    "4:4:4 JPEG, quality 95": lambda: encode(photo(), quality=95, subsampling=0),
    "grayscale JPEG": lambda: encode(photo().convert("L")),
    "CMYK JPEG": lambda: encode(photo().convert("CMYK")),
    "PNG": lambda: encode(photo(), "PNG"),
    "WebP": lambda: encode(photo(), "WEBP"),
    "JPEG padded after its end": lambda: encode(photo()) + bytes(20),
    "8x8 JPEG": lambda: encode(photo(8)),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_usable_images_pass_fast_and_full_checks(case, tmp_path):
    data = GOOD[case]()
    (tmp_path / "0.jpg").write_bytes(data)  # named .jpg whatever the format, as dataset files are
    for source in (data, tmp_path / "0.jpg"):
        assert check_image(source) is None
        assert check_image(source, full_decode=True, max_pixels=16_000_000) is None


BAD = {  # case: (bytes, reason of the fast check or None when only the full decode sees it, reason of the full check)
    "empty": (lambda: b"", "empty file", "empty file"),
    "text": (lambda: b"<html>not an image</html>", NOT_AN_IMAGE, NOT_AN_IMAGE),
    "GIF": (lambda: encode(photo(), "GIF"), NOT_AN_IMAGE, NOT_AN_IMAGE),
    "TIFF": (lambda: encode(photo(), "TIFF"), NOT_AN_IMAGE, NOT_AN_IMAGE),
    "BMP": (lambda: encode(photo(), "BMP"), NOT_AN_IMAGE, NOT_AN_IMAGE),
    "EPS": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 640 640\n" + bytes(2000), NOT_AN_IMAGE,
            NOT_AN_IMAGE),
    "truncated JPEG": (lambda: encode(photo())[:-500], "truncated JPEG", "truncated JPEG"),
    "too small": (lambda: encode(photo(7)), "too small (7x7)", "too small (7x7)"),
    "JPEG cut short, end marker put back": (lambda: encode(photo())[:3000] + b"\xff\xd9", None, "corrupt JPEG"),
    "JPEG with a zeroed middle": (lambda: zeroed_middle(encode(photo())), None, "corrupt JPEG"),
    "progressive JPEG with a zeroed middle": (lambda: zeroed_middle(encode(photo(), progressive=True)), None,
                                              "corrupt JPEG"),
    "96 px of data under a 2000x2000 header": (lambda: with_size(encode(photo(96)), 2000, 2000), None,
                                                "corrupt JPEG"),
    "truncated PNG": (lambda: encode(photo(), "PNG")[:-3000], None, "corrupt PNG"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unusable_images_get_a_reason(case, tmp_path):
    make, fast, full = BAD[case]
    data = make()
    (tmp_path / "0.jpg").write_bytes(data)
    for source in (data, tmp_path / "0.jpg"):
        reason = check_image(source)
        assert (reason is None) if fast is None else reason.startswith(fast), reason
        assert check_image(source, full_decode=True).startswith(full)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, over 89 M pixels: ours decides
def test_pixel_cap_reads_the_header_only():
    bomb = with_size(encode(photo(96)), 12000, 12000)  # 144 megapixels claimed over 96x96 px of data
    assert check_image(bomb, max_pixels=16_000_000) == f"{TOO_MANY_PIXELS} (12000x12000, over 16 megapixels)"
    png = encode(Image.new("RGB", (5000, 4000)), "PNG")  # 20 megapixels of black: small on the wire
    assert check_image(png, max_pixels=16_000_000).startswith(TOO_MANY_PIXELS)
    assert check_image(png, max_pixels=20_000_000) is None
    huge = encode(Image.new("1", (15000, 15000)), "PNG")  # over PIL's own bomb limit: refused even uncapped
    assert check_image(huge).startswith(TOO_MANY_PIXELS)


def test_missing_and_unreadable_files(tmp_path):
    assert check_image(tmp_path / "nope.jpg") == "missing"
    (tmp_path / "dir.jpg").mkdir()
    assert check_image(tmp_path / "dir.jpg") == "not a readable image (IsADirectoryError)"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_checked_gives_load_images_pixels_or_the_reason(tmp_path):
    from src.data.images import decode_checked, load_image

    for kind in ("JPEG", "PNG", "WEBP"):
        data = encode(photo(), kind)
        (tmp_path / "0.jpg").write_bytes(data)
        image = decode_checked(data, 32, max_pixels=16_000_000)
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(load_image(tmp_path / "0.jpg", 32)))
    assert decode_checked(encode(photo(), "PNG")[:-3000], 32).startswith("corrupt PNG")
    assert decode_checked(zeroed_middle(encode(photo())), 32).startswith("corrupt JPEG")
    assert decode_checked(encode(photo(), "GIF"), 32) == NOT_AN_IMAGE
    assert decode_checked(with_size(encode(photo(96)), 12000, 12000), 32, 16_000_000).startswith(TOO_MANY_PIXELS)
