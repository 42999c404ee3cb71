"""Plots: every function returns a Figure and writes a PNG, for image and non-image data,
atomically (a failed save leaves the previous file and no temporary file)."""

import pytest
import torch
from matplotlib.figure import Figure

from pvae import plots
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
