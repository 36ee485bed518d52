"""A LUMEN dataset with one instance of every data defect, generated from the demo writer."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from src.data.synthetic import write_demo_dataset

# a point about 2.8 km outside the 1:10m border, north of Čakovec (kept: border roads fall outside the outline)
JUST_OUTSIDE = (46.57, 16.33)
FAR_OUTSIDE = (47.4979, 19.0402)  # Budapest


def write_defect_corpus(out_dir: Path, n_clean: int = 24) -> dict[str, list[str]]:
    """Write the corpus into `out_dir`; returns the expected outcome per uuid group.

    Keys: 'clean' (kept, plus the odd-but-usable images), and one key per skip reason of the ingest
    stage, plus 'orphan' (folder without row), 'just_outside' (kept) and 'folders' (every uuid folder
    on disk: what `src.predict --images` must write a row for).
    """
    write_demo_dataset(out_dir, n_locations=n_clean + 13, image_size=32, seed=7)
    table = pd.read_csv(out_dir / "data.csv")
    uuids = list(table["uuid"])
    root = out_dir / "data"
    clean, defect = uuids[:n_clean], uuids[n_clean:]
    expected = {"clean": list(clean)}

    # usable oddities stay in "clean": a PNG named .jpg, a grayscale JPEG, a CMYK JPEG, a 50x30 image
    Image.open(root / clean[0] / "0.jpg").save(root / clean[0] / "0.jpg", format="PNG")
    Image.open(root / clean[1] / "90.jpg").convert("L").save(root / clean[1] / "90.jpg")
    Image.open(root / clean[2] / "180.jpg").convert("CMYK").save(root / clean[2] / "180.jpg")
    Image.open(root / clean[3] / "270.jpg").resize((50, 30)).save(root / clean[3] / "270.jpg")

    def rows(i):
        return table["uuid"] == defect[i]

    table.loc[rows(0), "latitude"] = np.nan
    table["latitude"] = table["latitude"].astype(object)
    table.loc[rows(1), "latitude"] = "not-a-number"
    expected["invalid coordinates"] = [defect[0], defect[1]]
    duplicate = table[rows(2)]
    expected["duplicate uuid"] = [defect[2]]  # the second row of this uuid is skipped, the first kept
    expected["clean"].append(defect[2])
    _remove_folder(root / defect[3])
    expected["missing folder"] = [defect[3]]
    (root / defect[4] / "90.jpg").unlink()
    data = (root / defect[5] / "0.jpg").read_bytes()
    (root / defect[5] / "0.jpg").write_bytes(data[: len(data) // 2])
    (root / defect[6] / "180.jpg").write_bytes(b"")
    (root / defect[7] / "270.jpg").write_text("<html>not an image</html>")
    (root / defect[12] / "90.jpg").unlink()
    (root / defect[12] / "90.jpg").mkdir()  # a view that is a directory
    expected["bad view"] = [defect[4], defect[5], defect[6], defect[7], defect[12]]
    table.loc[rows(8), ["latitude", "longitude"]] = FAR_OUTSIDE
    expected["outside Croatia"] = [defect[8]]
    table.loc[rows(9), ["latitude", "longitude"]] = JUST_OUTSIDE
    expected["just_outside"] = [defect[9]]
    expected["clean"].append(defect[9])
    table.loc[rows(10), "uuid"] = ""
    expected["missing uuid"] = [""]
    expected["orphan"] = [defect[10]]  # its folder lost its row
    expected["clean"].append(defect[11])

    expected["folders"] = sorted(folder.name for folder in root.iterdir())

    # the real LUMEN CSVs carry a leading unnamed index and extra columns
    table = pd.concat([table, duplicate], ignore_index=True)
    table.insert(0, "panorama_id", "x")
    table["status"] = "OK"
    table.to_csv(out_dir / "data.csv")
    return expected


def _remove_folder(folder: Path) -> None:
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
