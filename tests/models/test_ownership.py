"""How zoo models name themselves in Pyro's global parameter store: a unique name per live
instance, released when the instance is collected with nothing stored, never reused once
stored. That every registered model owns its parameters (two instances train independently,
each its own tensors) is part of the contract suite, tests/contract/test_contract.py."""

from __future__ import annotations

import gc

import pyro
import pytest
import torch

from pvae.models import VAE


def test_names_are_unique_per_live_instance_and_released():
    a, b = VAE(4, 2, hidden=(3,)), VAE(4, 2, hidden=(3,))
    assert a._pyro_name == "vae" or a._pyro_name.startswith("vae_")
    assert a._pyro_name != b._pyro_name
    name = b._pyro_name
    del b
    gc.collect()
    c = VAE(4, 2, hidden=(3,))
    assert c._pyro_name == name  # the name of a collected model (with nothing stored) is free
    del a, c


def test_a_stored_name_is_not_reused():
    gc.collect()
    a = VAE(4, 2, hidden=(3,))
    a.model(torch.zeros(2, 4))  # registers a's decoder in the store
    held = a._pyro_name
    del a
    gc.collect()
    b = VAE(4, 2, hidden=(3,))
    assert b._pyro_name != held
    pyro.clear_param_store()


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="name"):
        VAE(4, 2, name="")
