"""A copy of dataset dirs at training resolution, so that loading is cheap.

Each dataset dir becomes OUT/<dir name>/ with its data.csv copied as is and every view decoded at reduced
scale (`src.data.images.load_image`, as training decodes it) and saved as a SIZE x SIZE JPEG (4:4:4 colour).
A view that cannot be decoded is copied byte for byte, so the copy shows src.enrich the same defects. Files
are written to temporary names and renamed; files already copied and not older than their source are kept,
so an interrupted run continues where it stopped. Work is spread over processes.
"""

import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from src.core.errors import UserError
from src.core.files import atomic_path
from src.data.images import VIEWS, load_image
from src.data.ingest import check_dataset_dirs, find_image_root, location_names

MIN_SIZE, MAX_SIZE = 16, 2048
CHUNK = 32  # location folders per task


def up_to_date(target: Path, source: Path) -> bool:
    """True when `target` exists and is not older than `source` (written by an earlier, complete run)."""
    try:
        return target.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def resize_folder(source: Path, target: Path, size: int, quality: int) -> tuple[int, int, list[str]]:
    """The views of one location folder: (views written, views already up to date, 'file: reason' copied as is)."""
    written, kept, copied = 0, 0, []
    for view in VIEWS:
        src, dst = source / f"{view}.jpg", target / f"{view}.jpg"
        if not src.is_file():
            continue  # a missing view stays missing: enrich reports it for the copy as for the original
        if up_to_date(dst, src):
            kept += 1
            continue
        try:
            image = load_image(src, size)
        except Exception as error:  # a damaged view: keep its bytes, the checks downstream report it
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(f"{src}: {type(error).__name__}")
            continue
        with atomic_path(dst) as tmp:
            image.save(tmp, format="JPEG", quality=quality, subsampling=0)  # full-resolution colour
        written += 1
    return written, kept, copied


def resize_chunk(pairs: list[tuple[Path, Path]], size: int, quality: int) -> tuple[int, int, list[str]]:
    """resize_folder over (source, target) folder pairs, counts summed (one task of the process pool)."""
    results = [resize_folder(source, target, size, quality) for source, target in pairs]
    return sum(r[0] for r in results), sum(r[1] for r in results), [line for r in results for line in r[2]]


def output_dirs(dataset_dirs: list[Path], out: Path) -> list[Path]:
    """OUT/<dir name> per dataset dir; two dirs with one name, or OUT inside a dataset dir, are errors."""
    names = [Path(d).resolve().name for d in dataset_dirs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--dataset-dirs: several dirs are named {repeated[0]}; their copies would share "
                        f"{out / repeated[0]}; resize them one at a time with different --out")
    for d in dataset_dirs:
        if out.resolve() == Path(d).resolve() or Path(d).resolve() in out.resolve().parents:
            raise UserError(f"--out {out}: inside the dataset dir {d}; write the copy somewhere else")
    return [out / name for name in names]


def resize_datasets(dataset_dirs: list[Path], out: Path, size: int, workers: int = 1, quality: int = 95,
                    progress: bool = True) -> dict:
    """Write the resized copies (see the module docstring); returns counts and the copied defects."""
    check_dataset_dirs(dataset_dirs)
    targets = output_dirs(dataset_dirs, out)
    pairs = []
    for dataset_dir, target in zip(dataset_dirs, targets):
        root = find_image_root(dataset_dir)
        pairs += [(root / name, target / "data" / name) for name in location_names(root)]
    for _, folder in pairs:
        folder.mkdir(parents=True, exist_ok=True)
    chunks = [pairs[i:i + CHUNK] for i in range(0, len(pairs), CHUNK)]
    written, kept, copied = 0, 0, []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(pairs), desc="resizing", unit="loc", disable=not progress, file=sys.stderr) as bar:
        futures = [pool.submit(resize_chunk, chunk, size, quality) for chunk in chunks]
        for future, chunk in zip(futures, chunks):
            done = future.result()
            written, kept, copied = written + done[0], kept + done[1], copied + done[2]
            bar.update(len(chunk))
    # data.csv last: a copy with a data.csv has all its images (the demo writer's convention)
    for dataset_dir, target in zip(dataset_dirs, targets):
        with atomic_path(target / "data.csv") as tmp:
            shutil.copyfile(Path(dataset_dir) / "data.csv", tmp)
    return {"locations": len(pairs), "written": written, "kept": kept, "copied": copied, "targets": targets}
