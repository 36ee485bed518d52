"""Enrich figures on the demo set: legends, grid lines on cell edges, empty cells apart from classes of one,
split colours, axis labels alike in every figure."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from PIL import Image  # noqa: E402

from src.data.enrich import enrich  # noqa: E402
from src.evaluation.plots import centroids_figure, class_sizes_figure, distribution_figure, enrich_figures, grid_figure, label_axes


@pytest.fixture(scope="module")
def enriched(demo_dir):
    return enrich([demo_dir], spacing=0.5, seed=0, progress=False)


def legend_texts(axes) -> list[str]:
    return [t.get_text() for t in axes.get_legend().get_texts()]


def label_size() -> float:
    """The size an axis label gets from the rc settings."""
    figure, axes = plt.subplots()
    axes.set_xlabel("x")
    size = axes.xaxis.label.get_fontsize()
    plt.close(figure)
    return size


def test_map_axes_are_labelled_at_the_normal_size(enriched):
    # geopandas labels unlabelled axes in a smaller font; every map keeps the size the histogram has
    for make in (grid_figure, class_sizes_figure, distribution_figure):
        axes = make(enriched).axes[0]
        assert (axes.xaxis.label.get_text(), axes.yaxis.label.get_text()) == ("longitude (deg)", "latitude (deg)")
        assert axes.xaxis.label.get_fontsize() == axes.yaxis.label.get_fontsize() == label_size()
        plt.close("all")
    figure, axes = plt.subplots()
    label_axes(axes, "t")
    assert axes.xaxis.label.get_fontsize() == label_size()
    plt.close(figure)


def test_grid_figure_has_a_legend_lines_on_the_cell_edges_and_round_ticks(enriched):
    grid = enriched.grid
    figure = grid_figure(enriched)
    figure.canvas.draw()
    axes = figure.axes[0]
    assert legend_texts(axes) == ["class (has train data)", "kept cell without train data", "Croatia's border and coast"]
    vertical, horizontal = axes.collections[:2]
    xs = np.array([segment[0, 0] for segment in vertical.get_segments()])
    ys = np.array([segment[0, 1] for segment in horizontal.get_segments()])
    np.testing.assert_allclose(xs, grid.min_lng + np.arange(grid.n_cols + 1) * grid.spacing)
    np.testing.assert_allclose(ys, grid.min_lat + np.arange(grid.n_rows + 1) * grid.spacing)
    # the grid starts at 42.42 N: ticks sit at round degrees instead, labelled 43, 44, ... (not 42.42, 43.42)
    for ticks, labels in ((axes.get_xticks(), axes.get_xticklabels()), (axes.get_yticks(), axes.get_yticklabels())):
        np.testing.assert_allclose(ticks * 2, np.round(ticks * 2), atol=1e-9)
        assert all(len(t.get_text()) <= 4 for t in labels), [t.get_text() for t in labels]
    # every filled cell has exactly the legend's class colour: nothing translucent over a land fill
    legend_colour = axes.get_legend().get_patches()[0].get_facecolor()
    filled = [c for c in axes.collections if len(c.get_facecolors()) and c.get_facecolors()[0][3] > 0]
    assert len(filled) == 1 and len(filled[0].get_paths()) == len(enriched.classes)
    assert np.allclose(filled[0].get_facecolors(), legend_colour)
    plt.close("all")


def test_grid_figure_of_adaptive_cells_has_no_empty_cell_entry(demo_dir):
    adaptive = enrich([demo_dir], cells="adaptive", n_classes=6, seed=0, progress=False)
    axes = grid_figure(adaptive).axes[0]
    assert legend_texts(axes) == ["class (its cell's land part)", "Croatia's border and coast"]
    plt.close("all")


def test_centroids_figure_keeps_plain_centroids_visible_under_the_clipped_crosses(enriched):
    axes = centroids_figure(enriched).axes[0]
    assert legend_texts(axes) == ["plain (cell land)", "clipped to land", "weighted (train mean)"]
    plain, clipped, weighted = (c for c in axes.collections if c.get_label() in legend_texts(axes))
    assert len(plain.get_offsets()) == len(enriched.classes)
    # plain: an open ring wider than the cross drawn over it, so a centroid where both agree shows both
    assert plain.get_facecolors().size == 0 or np.allclose(plain.get_facecolors()[:, 3], 0)
    assert plain.get_sizes()[0] >= 2 * clipped.get_sizes()[0]
    plt.close("all")


def test_histogram_bars_have_edges(enriched):
    bars = distribution_figure(enriched).axes[1].patches
    assert bars and all(bar.get_linewidth() > 0 and bar.get_edgecolor()[3] > 0 and bar.get_edgecolor() != bar.get_facecolor()
                        for bar in bars)
    plt.close("all")


def test_class_sizes_hatches_empty_cells_and_draws_the_coast(enriched):
    n_train = enriched.classes.set_index("cell")["n_train"]
    empty = (~enriched.grid.cells.index.isin(n_train.index)).sum()
    assert empty > 0 and (n_train == 1).any()  # the demo set has both kinds of cell
    axes = class_sizes_figure(enriched).axes[0]
    assert legend_texts(axes) == ["0 train locations (not a class)", "coastline / border"]
    hatched = [c for c in axes.collections if c.get_hatch()]
    assert len(hatched) == 1 and len(hatched[0].get_paths()) == empty
    classes = next(c for c in axes.collections if c.get_array() is not None)
    ones = classes.get_facecolors()[classes.get_array() == 1]
    assert len(ones) and not np.allclose(ones[0], hatched[0].get_facecolors()[0])  # 1 is not drawn like 0
    coast = [c for c in axes.collections if c.get_zorder() > classes.get_zorder()]
    assert coast and np.allclose(coast[0].get_edgecolors()[0], to_rgba("black"))  # on top of the cells
    plt.close("all")


def test_class_sizes_of_adaptive_cells_has_no_empty_cell_entry(demo_dir):
    adaptive = enrich([demo_dir], cells="adaptive", n_classes=6, seed=0, progress=False)
    axes = class_sizes_figure(adaptive).axes[0]
    assert legend_texts(axes) == ["coastline / border"]  # every adaptive cell holds train locations
    assert not [c for c in axes.collections if c.get_hatch()]
    plt.close("all")


def test_distribution_shows_val_and_test_in_different_colours_and_markers(enriched):
    axes = distribution_figure(enriched).axes[0]
    counts = enriched.locations["split"].value_counts()
    assert legend_texts(axes) == [f"{split} ({counts[split]})" for split in ("train", "val", "test")]
    by_split = {c.get_label().split(" ")[0]: c for c in axes.collections if c.get_label() in legend_texts(axes)}
    assert list(by_split) == ["train", "val", "test"]
    colours = {split: np.array(c.get_facecolors()[0][:3]) for split, c in by_split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert np.abs(colours[a] - colours[b]).sum() > 0.5  # far apart in RGB
    val_marker, test_marker = (by_split[s].get_paths()[0].vertices for s in ("val", "test"))
    assert val_marker.shape != test_marker.shape or not np.allclose(val_marker, test_marker)
    for split, collection in by_split.items():
        assert len(collection.get_offsets()) == counts[split]
    plt.close("all")


def test_enrich_figures_writes_every_figure(enriched, tmp_path):
    paths = enrich_figures(enriched, tmp_path / "figs", "demo")
    assert [p.name for p in paths] == ["grid_demo.png", "class_sizes_demo.png", "centroids_demo.png",
                                       "distribution_demo.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 500
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)  # no temp files
