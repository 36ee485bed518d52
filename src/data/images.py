"""Street View image files: the four views of a location, integrity checks, reduced-size decoding."""

from pathlib import Path

from PIL import Image

VIEWS = (0, 90, 180, 270)  # headings in degrees, the order of a quadruplet everywhere
N_VIEWS = len(VIEWS)
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"


def view_paths(location_dir: str | Path) -> list[Path]:
    """The four view files of a location folder, in view order 0, 90, 180, 270."""
    return [Path(location_dir) / f"{view}.jpg" for view in VIEWS]


def check_image(path: str | Path, full_decode: bool = False) -> str | None:
    """None when `path` looks like a usable image, else a short reason.

    The fast check reads the header (PIL identifies the format and size without decoding) and,
    for JPEGs, checks the end-of-image marker so that truncated downloads are caught.
    `full_decode` decodes every pixel instead.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as image:
            if full_decode:
                image.load()
            elif image.format == "JPEG":
                with open(path, "rb") as handle:
                    handle.seek(max(0, size - 64))
                    # some encoders pad after EOI, so look at the last bytes rather than the last two
                    if JPEG_EOI not in handle.read():
                        return "truncated JPEG (no end-of-image marker)"
            if image.width < 8 or image.height < 8:
                return f"too small ({image.width}x{image.height})"
    except Exception as error:  # PIL raises many types for corrupt files
        return f"not a readable image ({type(error).__name__})"
    return None


def load_image(path: str | Path, image_size: int) -> Image.Image:
    """Decode `path` as an RGB image of image_size x image_size.

    JPEGs are decoded at reduced scale (libjpeg DCT scaling via PIL's draft mode: 1/2, 1/4, 1/8) to
    the smallest size still >= image_size, so a 640x640 file is never fully decoded for a 224 input.
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (image_size, image_size))
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
        return image
