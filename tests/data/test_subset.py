"""pvae.data.subset and pvae.data.rows: the first points of every split, cut row-wise whatever
the split holds (a tensor, labels, modalities, a dynamically binarised set, sequences and
their generating truth)."""

import pytest
import torch

from pvae import data


def test_every_split_and_its_labels_keep_their_first_rows():
    ds = data.load("digits-labels", seed=0)
    cut = data.subset(ds, 7, 3)
    for split, n in (("train", 7), ("valid", 3), ("test", 3)):
        whole, part = getattr(ds, split), getattr(cut, split)
        assert isinstance(part, tuple) and len(part) == len(whole)  # both modalities
        for full, head in zip(whole, part, strict=True):
            assert torch.equal(head, full[:n])
        labels = getattr(ds, f"{split}_labels")
        if labels is not None:
            assert torch.equal(getattr(cut, f"{split}_labels"), labels[:n])
    assert cut.name == ds.name and cut.likelihood == ds.likelihood


def test_a_dynamically_binarised_train_split_stays_dynamic():
    ds = data.load("digits", seed=0, binarize="dynamic")
    cut = data.subset(ds, 5, None)
    assert isinstance(cut.train, data.DynamicBinarized) and len(cut.train) == 5
    assert torch.equal(cut.train.probs, ds.train.probs[:5])
    assert cut.test is ds.test  # None keeps a split whole


def test_sequences_and_their_truth_are_cut_per_sequence():
    ds = data.load("lds", seed=0)
    cut = data.subset(ds, 4, 2)
    assert isinstance(cut.train, data.SequenceSplit)
    for name, whole, part in zip(ds.train._fields, ds.train, cut.train, strict=True):
        assert torch.equal(part, whole[:4]), name
    for split, n in (("train", 4), ("test", 2)):
        for key, value in cut.truth[split].items():
            if isinstance(value, torch.Tensor) and value.shape[:1] == (len(ds.truth[split][key]),):
                assert torch.equal(value, ds.truth[split][key][:n]), key
    assert cut.test.values.shape[0] == 2


@pytest.mark.parametrize("limits", [(0, None), (None, -1), (2.5, None), (True, None)])
def test_a_limit_that_is_not_a_positive_integer_is_refused(limits):
    with pytest.raises((ValueError, TypeError), match="max_train|max_eval"):
        data.subset(data.load("linear-gaussian", seed=0), *limits)
