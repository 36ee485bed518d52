import os
import shutil

import geopandas as gpd
import pandas as pd
import pytest
import shapely

from src.core import geo
from src.core.errors import UserError
from src.data.ingest import CheckManifest, check_dataset_dirs, find_image_root, read_datasets
from tests.corpus import JUST_OUTSIDE, write_defect_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, write_defect_corpus(out)


@pytest.fixture(scope="module")
def ingested(corpus):
    return read_datasets([corpus[0]], progress=False)


def skipped_uuids(ingested, reason):
    return sorted(ingested.skipped.loc[ingested.skipped["reason"] == reason, "uuid"])


def test_clean_and_usable_odd_images_are_kept(corpus, ingested):
    _, expected = corpus
    assert sorted(ingested.locations["uuid"]) == sorted(expected["clean"])
    assert ingested.locations["uuid"].is_unique


@pytest.mark.parametrize("reason", ["invalid coordinates", "duplicate uuid", "missing folder", "bad view",
                                    "outside Croatia", "missing uuid"])
def test_each_defect_is_skipped_and_listed(corpus, ingested, reason):
    _, expected = corpus
    assert skipped_uuids(ingested, reason) == sorted(expected[reason])


def test_nothing_is_lost_silently(corpus, ingested):
    assert ingested.n_read == len(ingested.locations) + len(ingested.skipped)


def test_bad_view_details_name_the_file(ingested):
    details = " | ".join(ingested.skipped.loc[ingested.skipped["reason"] == "bad view", "detail"])
    for fragment in ("90.jpg: missing", "180.jpg: empty file", "270.jpg: not a readable image", "0.jpg:"):
        assert fragment in details


def test_folder_without_row_is_reported(corpus, ingested):
    _, expected = corpus
    assert [p.split("/")[-1] for p in ingested.orphans["folder"]] == expected["orphan"]


def test_points_just_outside_the_border_are_kept_far_ones_rejected(corpus, ingested):
    # independent check that the kept point is really outside the outline, but within 10 km
    point = gpd.GeoSeries([shapely.Point(JUST_OUTSIDE[1], JUST_OUTSIDE[0])], crs=geo.WGS84).to_crs(geo.CROATIA_CRS)
    border = gpd.read_file(geo.BORDER_FILE).to_crs(geo.CROATIA_CRS).geometry.iloc[0]
    assert 0 < point.distance(border).iloc[0] < 10_000
    _, expected = corpus
    assert expected["just_outside"][0] in set(ingested.locations["uuid"])
    strict = read_datasets([corpus[0]], max_outside_km=1.0, check_images=False, progress=False)
    assert expected["just_outside"][0] in skipped_uuids(strict, "outside Croatia")


def test_truncated_jpeg_caught_by_fast_and_full_checks(tmp_path, demo_dir):
    shutil.copytree(demo_dir, tmp_path / "d")
    folder = next((tmp_path / "d" / "data").iterdir())
    data = (folder / "0.jpg").read_bytes()
    (folder / "0.jpg").write_bytes(data[:-200])  # cut off the end: header still parses
    for full in (False, True):
        result = read_datasets([tmp_path / "d"], full_decode=full, progress=False)
        assert skipped_uuids(result, "bad view") == [folder.name]


def test_several_dirs_merge_and_duplicates_across_dirs(tmp_path, demo_dir):
    shutil.copytree(demo_dir, tmp_path / "a")
    (tmp_path / "a" / "data").rename(tmp_path / "a" / "images")  # the other LUMEN layout
    shutil.copytree(demo_dir, tmp_path / "b")
    result = read_datasets([tmp_path / "a", tmp_path / "b"], check_images=False, progress=False)
    n = len(pd.read_csv(demo_dir / "data.csv"))
    assert len(result.locations) == n and set(result.locations["dataset_dir"]) == {str(tmp_path / "a")}
    assert len(skipped_uuids(result, "duplicate uuid")) == n
    assert result.locations["image_dir"].str.contains("/a/images/").all()


def test_missing_column_is_a_one_line_user_error(tmp_path, demo_dir):
    shutil.copytree(demo_dir, tmp_path / "d")
    table = pd.read_csv(tmp_path / "d" / "data.csv").drop(columns=["longitude"])
    table.to_csv(tmp_path / "d" / "data.csv", index=False)
    with pytest.raises(UserError, match=r"data.csv: missing column\(s\) longitude") as error:
        read_datasets([tmp_path / "d"], progress=False)
    assert "\n" not in str(error.value)


def test_missing_dir_and_missing_csv_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such dataset directory"):
        read_datasets([tmp_path / "nope"])
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="data.csv: not found"):
        read_datasets([tmp_path])
    assert find_image_root(tmp_path) == tmp_path / "images"


def test_image_checks_are_remembered_by_path_size_and_mtime(tmp_path, demo_dir):
    dataset = tmp_path / "demo"
    shutil.copytree(demo_dir, dataset)
    cache = tmp_path / "checks"
    first = read_datasets([dataset], progress=False, check_cache=cache)
    assert len(first.locations) == 120 and first.skipped.empty
    assert len(list(cache.glob("*.csv"))) == 1
    manifest = pd.read_csv(next(cache.glob("*.csv")))
    assert len(manifest) == 4 * 120 and manifest["reason"].isna().all()
    # spoil one view but keep its size and modification time: the manifest answers, the file is not re-opened
    view = sorted((dataset / "data").iterdir())[0] / "90.jpg"
    stat = view.stat()
    view.write_bytes(b"\0" * stat.st_size)
    os.utime(view, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_datasets([dataset], progress=False, check_cache=cache).skipped.empty
    # without the manifest, or once the mtime changes, the damage is found
    assert skipped_uuids(read_datasets([dataset], progress=False), "bad view") == [view.parent.name]
    os.utime(view, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = read_datasets([dataset], progress=False, check_cache=cache)
    assert skipped_uuids(again, "bad view") == [view.parent.name]
    assert "90.jpg: not a readable image" in again.skipped["detail"].iloc[0]
    # the manifest now holds the bad result for that file
    manifest = pd.read_csv(next(cache.glob("*.csv")))
    assert manifest["reason"].notna().sum() == 1


def test_manifest_counts_rechecks_and_ignores_a_damaged_manifest(tmp_path, demo_dir):
    root = find_image_root(demo_dir)
    cache = tmp_path / "checks"
    views = [p for folder in sorted(root.iterdir())[:5] for p in sorted(folder.iterdir())]
    manifest = CheckManifest(root, cache, full_decode=False)
    assert [manifest.check(p) for p in views] == [None] * 20 and manifest.rechecked == 20
    manifest.save()
    warm = CheckManifest(root, cache, full_decode=False)
    assert [warm.check(p) for p in views] == [None] * 20 and warm.rechecked == 0
    # a full-decode check does not trust a fast check's result; the reverse is fine
    full = CheckManifest(root, cache, full_decode=True)
    assert [full.check(p) for p in views] == [None] * 20 and full.rechecked == 20
    full.save()
    fast = CheckManifest(root, cache, full_decode=False)
    assert [fast.check(p) for p in views] == [None] * 20 and fast.rechecked == 0
    next(cache.glob("*.csv")).write_bytes(b"\x00\xffgarbage")
    rebuilt = CheckManifest(root, cache, full_decode=False)
    assert [rebuilt.check(p) for p in views] == [None] * 20 and rebuilt.rechecked == 20


def test_check_dataset_dirs_fails_fast(tmp_path, demo_dir):
    check_dataset_dirs([demo_dir])
    with pytest.raises(UserError, match="no such dataset directory"):
        check_dataset_dirs([demo_dir, tmp_path / "nope"])
    with pytest.raises(UserError, match="data.csv: not found"):
        check_dataset_dirs([tmp_path])
