"""Plots: every function returns a Figure and writes a PNG, for image and non-image data,
atomically (a failed save leaves the previous file and no temporary file)."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pvae import plots
from pvae.diagnostics.figures import (
    activity_bars,
    kl_bars,
    path_grid,
    relevance_curve,
    selection_curves,
)
from pvae.diagnostics.relevance import LatentRelevance
from pvae.models.bayesian_ae import PriorSelection
from pvae.train import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"epoch": 0, "train_bound": -90.0, "valid_bound": -92.0, "seconds": 0.1, "steps": 3},
    {"epoch": 1, "train_bound": -85.0, "valid_bound": -88.0, "seconds": 0.1, "steps": 3},
    {"epoch": 2, "train_bound": -83.0, "valid_bound": None, "seconds": 0.1, "steps": 3},
]


def assert_png(fig, path):
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "runs",
    [
        HISTORY,
        Run(history=HISTORY),
        {"elbo": HISTORY, "iwae": Run(history=HISTORY[:2])},
        [],
    ],
    ids=["history", "run", "several", "empty"],
)
def test_learning_curve(tmp_path, runs):
    path = tmp_path / "curve.png"
    fig = plots.learning_curve(runs, path=path)
    assert_png(fig, path)


def test_learning_curve_draws_one_colour_per_run():
    fig = plots.learning_curve({"a": HISTORY, "b": HISTORY})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4  # train and valid per run
    assert {line.get_color() for line in lines} == {"C0", "C1"}


@pytest.mark.parametrize(
    "image_shape", [(1, 8, 8), (3, 4, 5), (8, 8)], ids=["grey", "rgb", "2d-shape"]
)
def test_image_grid(tmp_path, image_shape):
    x_dim = 1
    for size in image_shape:
        x_dim *= size
    path = tmp_path / "grid.png"
    fig = plots.image_grid(torch.rand(10, x_dim), image_shape, nrow=4, title="t", path=path)
    assert_png(fig, path)


def test_image_grid_outside_unit_interval_and_non_image(tmp_path):
    fig = plots.image_grid(3 * torch.randn(5, 64), (1, 8, 8), nrow=5, title="gaussian")
    assert isinstance(fig, Figure)
    path = tmp_path / "scatter.png"
    assert_png(plots.image_grid(torch.randn(20, 3), None, nrow=4, title="t", path=path), path)


def test_image_grid_rejects_a_wrong_image_shape():
    with pytest.raises(ValueError, match="image_shape"):
        plots.image_grid(torch.rand(4, 64), (1, 7, 7), nrow=2, title="t")


@pytest.mark.parametrize(
    "x_dim, image_shape",
    [(64, (1, 8, 8)), (5, None), (1, None)],
    ids=["image", "vectors", "scalars"],
)
def test_reconstructions(tmp_path, x_dim, image_shape):
    x = torch.rand(6, x_dim)
    path = tmp_path / "rec.png"
    fig = plots.reconstructions(x, x + 0.1 * torch.randn_like(x), image_shape, path=path)
    assert_png(fig, path)


def test_reconstructions_need_matching_shapes():
    with pytest.raises(ValueError, match="same shape"):
        plots.reconstructions(torch.rand(3, 64), torch.rand(4, 64), (1, 8, 8))


@pytest.mark.parametrize(
    "x_dim, image_shape, data",
    [(64, (1, 8, 8), None), (4, None, torch.randn(50, 4)), (1, None, None)],
    ids=["image", "vectors-with-data", "scalars"],
)
def test_samples(tmp_path, x_dim, image_shape, data):
    path = tmp_path / "samples.png"
    fig = plots.samples(torch.rand(16, x_dim), image_shape, path=path, data=data)
    assert_png(fig, path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "figure.png"
    path.write_bytes(b"previous")
    fig = plots.image_grid(torch.rand(4, 64), (1, 8, 8), nrow=2, title="t")

    def crash(self, stream, **kw):
        stream.write(b"half a png")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        plots.save(fig, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_save_follows_the_suffix_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "figure.svg"
    plots.learning_curve(HISTORY, path=path)
    assert path.read_text().lstrip().startswith("<?xml")


# ---------------------------------------------------------------------------------------------
# Diagnostic figures stay legible from 2 to 40 latent dimensions
# ---------------------------------------------------------------------------------------------


def _drawn_text(fig):
    """Every non-empty text a reader sees: tick labels inside the view, titles, axis labels
    and the figure's own labels, after a real draw (Agg)."""
    FigureCanvasAgg(fig).draw()
    texts = [text for text in fig.texts if text.get_visible()]
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = sorted(limits)
            for tick in axis.get_major_ticks():
                if tick.get_visible() and low <= tick.get_loc() <= high:
                    texts += [tick.label1, tick.label2]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlapping_text(fig):
    """The pairs of drawn texts whose bounding boxes overlap (by more than a pixel each way)."""
    texts = _drawn_text(fig)
    renderer = fig.canvas.get_renderer()
    boxes = np.array([t.get_window_extent(renderer).extents for t in texts])  # x0 y0 x1 y1
    if len(boxes) < 2:
        return []
    wide = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(
        boxes[:, None, 0], boxes[None, :, 0]
    )
    tall = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(
        boxes[:, None, 1], boxes[None, :, 1]
    )
    hits = np.argwhere(np.triu((wide > 1.0) & (tall > 1.0), k=1))
    return [(texts[i].get_text(), texts[j].get_text()) for i, j in hits]


def _relevance(dims, generator):
    scores = torch.rand(dims, generator=generator, dtype=torch.float64) ** 4
    ranking = torch.argsort(scores, descending=True).tolist()
    cumulative = torch.cumsum(scores[ranking], 0) / scores.sum()
    k = int((cumulative < 0.99).sum()) + 1
    return LatentRelevance(scores, ranking, cumulative, ranking[:k], 0.99, scores, scores, scores)


@pytest.mark.parametrize("dims", [2, 20, pytest.param(40, marks=pytest.mark.slow)])
def test_diagnostic_figures_have_no_overlapping_labels(dims):
    generator = torch.Generator().manual_seed(dims)
    kl = 3 * torch.rand(dims, generator=generator, dtype=torch.float64)
    kl[::3] = 1e-4  # some collapsed dimensions
    steps = 50
    paths = 0.3 * torch.randn(steps, dims, generator=generator, dtype=torch.float64).cumsum(0)
    relevance = _relevance(dims, generator)
    figures = {
        "kl_per_dim": kl_bars({"z": kl}),
        "kl_two_layers": kl_bars({"z1": kl, "z2": kl[: max(1, dims // 2)]}),
        "activity": activity_bars({"z": kl / 2}),
        "relevance": relevance_curve(relevance),
        "paths": path_grid(paths, torch.full_like(paths, 0.2), "z"),
    }
    for name, fig in figures.items():  # (saving is checked in test_collapse.py)
        assert overlapping_text(fig) == [], name
    # every dimension has a tick; the bars' labels name the dimensions under them
    ax = figures["kl_per_dim"].axes[0]
    ticks = {*ax.get_xticks(minor=True), *ax.get_xticks()}  # minor ones where no major one is
    assert sorted(ticks) == list(range(dims))
    for tick, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True):
        assert label.get_text() == str(int(tick))
    ax = figures["relevance"].axes[0]
    for tick, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True):
        assert label.get_text() == str(relevance.ranking[int(tick)])
    # the paths share their axes, and every channel has its panel
    drawn = [ax for ax in figures["paths"].axes if ax.axison]
    assert len(drawn) == dims and len({ax.get_ylim() for ax in drawn}) == 1


def test_path_grid_checks_its_shapes():
    with pytest.raises(ValueError, match=r"mean must have shape \(T, C\)"):
        path_grid(torch.zeros(5))
    with pytest.raises(ValueError, match="sd must have the shape of mean"):
        path_grid(torch.zeros(5, 2), torch.zeros(5, 3))


SCALES = (0.03, 0.1, 0.3, 1.0, 3.0)


def test_selection_curves_give_each_metric_its_axis_and_mark_its_minimum(tmp_path):
    # the distances of tutorial 08: SW about 0.46-0.50, DSWD about 9.9-10.3, minima apart
    sw = [0.499, 0.478, 0.459, 0.473, 0.473]
    dswd = [10.004, 9.913, 10.228, 10.249, 10.252]
    path = tmp_path / "selection.png"
    chosen = PriorSelection(SCALES[1], 1, "dswd", dswd, list(SCALES))  # select_prior's answer
    fig = selection_curves({"sw": (SCALES, sw), "dswd": chosen}, path=path)
    assert_png(fig, path)
    assert overlapping_text(fig) == []
    for ax, distances in zip(fig.axes, (sw, dswd), strict=True):
        best = int(np.argmin(distances))
        (star,) = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert list(star.get_xdata()) == [SCALES[best]]
        assert list(star.get_ydata()) == [distances[best]]
        assert f"minimum at {SCALES[best]:g}" in ax.get_title()
        low, high = ax.get_ylim()  # the curve fills its own axis: the minimum stands out
        assert (max(distances) - min(distances)) / (high - low) > 0.8
        assert ax.get_xscale() == "log"
    recorded = {"metric": "dswd", "chosen": 1.0, "candidates": [0.1, 1.0], "distances": [2, 1]}
    fig = selection_curves({"dswd": recorded})  # as a pvae sample run records it
    assert list(fig.axes[0].get_lines()[-1].get_xdata()) == [1.0]
    fig = selection_curves({"dswd": ([{"decoder": 0.1}, {"decoder": 1.0}], [2.0, 1.0])})
    assert fig.axes[0].get_xscale() == "linear" and "minimum at" in fig.axes[0].get_title()


@pytest.mark.parametrize(
    "selections, match",
    [({}, "selections is empty"), ({"sw": (SCALES, [1.0])}, "as many candidates as distances")],
)
def test_selection_curves_refuse_bad_input(selections, match):
    with pytest.raises(ValueError, match=match):
        selection_curves(selections)


def test_traversals_decode_the_moved_dimension_only(tmp_path):
    """A linear decoder x = W z: each panel's line for x[i] is W[i] (mu + t e_d), t over the
    span, so its slope is W[i, d]; an image decoder gives an image grid written to ``path``."""
    from pvae.diagnostics.figures import traversals

    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])  # (x_dim 2, D 3)
    mu = torch.tensor([0.2, -0.1, 0.4])
    fig = traversals(lambda z: z @ weight.T, mu, [1, 2], span=2.0, steps=5)
    offsets = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64)
    for ax, d in zip(fig.axes, [1, 2], strict=True):
        assert ax.get_title() == f"dimension {d}"
        for i, line in enumerate(ax.get_lines()):
            expected = (weight[i].double() @ mu.double()) + weight[i, d].double() * offsets
            assert torch.allclose(torch.as_tensor(line.get_ydata()), expected, atol=1e-6)
    path = tmp_path / "traversals.png"
    image = traversals(lambda z: z.repeat(1, 12), mu, [0], image_shape=(6, 6), path=path)
    assert_png(image, path)


def test_posterior_paths_are_none_without_a_two_dimensional_event(tmp_path):
    import pyro

    from pvae.diagnostics.figures import posterior_paths

    def guide(x, event=(4, 2)):
        with pyro.plate("data", 1):
            prior = pyro.distributions.Normal(torch.zeros(1, *event), 1.0)
            pyro.sample("z", prior.to_event(len(event)))

    path = tmp_path / "paths.png"
    fig = posterior_paths(guide, (torch.zeros(1, 3),), "z", path=path)
    assert_png(fig, path)
    assert len([ax for ax in fig.axes if ax.axison]) == 2  # (T 4, C 2): two channels
    assert posterior_paths(lambda x: guide(x, (4, 2, 1)), (torch.zeros(1, 3),)) is None
