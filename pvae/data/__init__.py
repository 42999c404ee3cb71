"""A registry of datasets: real ones shipped in installed packages, real ones read from the
user's IDX files, and seeded synthetic generators. Nothing is downloaded.

Usage::

    from pvae import data
    ds = data.load("digits", seed=0, binarize="dynamic")
    ds.train, ds.valid, ds.test      # (N, x_dim) float32 tensors (train may be a Dataset)
    data.available()                 # [DatasetInfo(name, description, source), ...]
    data.subset(ds, 500, 100)        # its first 500 training, 100 valid and test points

Every split is made by a permutation drawn from a ``torch.Generator`` seeded with ``seed``,
so ``load`` is deterministic. Images are flattened to ``(N, x_dim)`` with values in
``[0, 1]``; ``ds.image_shape`` gives the ``(channels, height, width)`` to reshape to.

Binarisation of image sets (``binarize=``):

- ``None``: grey levels in ``[0, 1]``;
- ``"static"``: every pixel of every split is Bernoulli-sampled once, with the seed;
- ``"dynamic"`` (default): the train split is a :class:`DynamicBinarized` dataset that
  re-samples the pixels from torch's global RNG on every access (Salakhutdinov & Murray,
  2008); valid and test are binarised statically so that evaluation is fixed.

Sequence sets (``pendulum``, ``rotating-digits``) return :class:`SequenceSplits`: each split is
a :class:`SequenceSplit` ``(values (N, T, *event_shape), times (N, T), mask (N, T))``, a tuple
that ``pvae.fit`` and ``pvae.log_likelihood`` pass to the pair as ``model(values, times,
mask)`` (mask True = observed; hidden steps hold zeros), with ``ds.event_shape``,
``ds.num_steps`` and the generating truth in ``ds.truth[split]``::

    ds = data.load("pendulum", num_steps=50, missing=0.3, noise=0.05, seed=0)
    values, times, mask = ds.train             # (800, 50, 1, 16, 16), (800, 50), (800, 50)
    ds.truth["train"]["angles"]                # (800, 50) radians

Adding a dataset is one function decorated with :func:`register` that returns
:class:`Splits`; a synthetic generator draws ``x`` (and its truth) and hands it to
``_synthetic_splits``, a sequence generator hands its parts to
``pvae.data.sequences._sequence_splits``.

The package's modules: :mod:`~pvae.data.containers` (:class:`Splits`, :class:`MultimodalSplits`,
:class:`SequenceSplits`, :class:`DynamicBinarized`), :mod:`~pvae.data.registry`
(:func:`register`, :func:`available`, :func:`load`), :mod:`~pvae.data.idx` (:func:`read_idx`),
:mod:`~pvae.data.images` (digits, MNIST-5k, MNIST, Fashion-MNIST),
:mod:`~pvae.data.synthetic` (``linear-gaussian`` and its exact truths),
:mod:`~pvae.data.quadrants` (:func:`quadrants`), :mod:`~pvae.data.multimodal` (paired sets),
:mod:`~pvae.data.sequences` (``pendulum``, ``rotating-digits``).
"""

# Importing the modules registers their datasets. The private helpers of the former single
# module stay reachable from pvae.data as explicit re-exports ("import x as x"); new code imports
# them from their own module.
from pvae.data import gp_sets as gp_sets
from pvae.data.containers import (
    BINARIZE_CHOICES,
    DatasetInfo,
    DynamicBinarized,
    MultimodalSplits,
    SequenceSplit,
    SequenceSplits,
    Splits,
    rows,
    subset,
)
from pvae.data.containers import _check_binarize as _check_binarize
from pvae.data.containers import _check_sequence_split as _check_sequence_split
from pvae.data.containers import _permutation_split as _permutation_split
from pvae.data.idx import _GZIP_MAGIC as _GZIP_MAGIC
from pvae.data.idx import _IDX_DTYPES as _IDX_DTYPES
from pvae.data.idx import _find_idx as _find_idx
from pvae.data.idx import _read_idx_pair as _read_idx_pair
from pvae.data.idx import read_idx
from pvae.data.images import _DATA_EXTRA_HINT as _DATA_EXTRA_HINT
from pvae.data.images import _digits as _digits
from pvae.data.images import _digits_pool as _digits_pool
from pvae.data.images import _fashion_mnist as _fashion_mnist
from pvae.data.images import _image_splits as _image_splits
from pvae.data.images import _load_idx_dataset as _load_idx_dataset
from pvae.data.images import _mnist as _mnist
from pvae.data.images import _mnist5k as _mnist5k
from pvae.data.images import _mnist5k_pool as _mnist5k_pool
from pvae.data.images import _shuffled_image_splits as _shuffled_image_splits
from pvae.data.mm_gp import MultimodalSequenceSplit, MultimodalSequenceSplits
from pvae.data.multimodal import TWO_VIEW_TRANSFORMS
from pvae.data.multimodal import _digits_labels as _digits_labels
from pvae.data.multimodal import _digits_two_view as _digits_two_view
from pvae.data.multimodal import _mnist5k_labels as _mnist5k_labels
from pvae.data.multimodal import _mnist5k_two_view as _mnist5k_two_view
from pvae.data.multimodal import _paired_image_splits as _paired_image_splits
from pvae.data.multimodal import _transformed as _transformed
from pvae.data.oscillators import true_eigenvalues
from pvae.data.quadrants import QUADRANT_ORDER, Quadrants, quadrants
from pvae.data.registry import _REGISTRY as _REGISTRY
from pvae.data.registry import Loader as Loader
from pvae.data.registry import _check_finite as _check_finite
from pvae.data.registry import _normalise_name as _normalise_name
from pvae.data.registry import available, load, register
from pvae.data.sequences import _pendulum as _pendulum
from pvae.data.sequences import _rotating_digits as _rotating_digits
from pvae.data.sequences import exact_log_likelihood, lds_log_likelihood
from pvae.data.synthetic import _check_positive as _check_positive
from pvae.data.synthetic import _linear_gaussian as _linear_gaussian
from pvae.data.synthetic import _synthetic_splits as _synthetic_splits
from pvae.data.synthetic import linear_gaussian_log_likelihood, linear_gaussian_posterior

__all__ = [
    "BINARIZE_CHOICES",
    "DatasetInfo",
    "DynamicBinarized",
    "MultimodalSequenceSplit",
    "MultimodalSequenceSplits",
    "MultimodalSplits",
    "QUADRANT_ORDER",
    "Quadrants",
    "SequenceSplit",
    "SequenceSplits",
    "Splits",
    "TWO_VIEW_TRANSFORMS",
    "available",
    "exact_log_likelihood",
    "lds_log_likelihood",
    "linear_gaussian_log_likelihood",
    "linear_gaussian_posterior",
    "load",
    "quadrants",
    "read_idx",
    "true_eigenvalues",
    "register",
    "rows",
    "subset",
]
