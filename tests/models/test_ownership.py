"""Every zoo model owns its parameters: two instances built with the same (default) arguments
in one process train independently, each its own tensors (Pyro's parameter store is global
and would otherwise hand the second model the first one's tensors)."""

from __future__ import annotations

import gc

import pyro
import pytest
import torch
from pyro import poutine

import pvae
from pvae.models import ARDVAE, CVAE, VAE, HierarchicalVAE, MultimodalVAE


def _binary(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


def _data(kind: str) -> tuple[torch.Tensor, ...]:
    if kind == "cvae":
        return (_binary(32, 6, 1), _binary(32, 5, 2))
    if kind == "multimodal":
        return (_binary(32, 6, 1), torch.randn(32, 3, generator=torch.Generator().manual_seed(2)))
    if kind == "ard":
        return (torch.randn(32, 6, generator=torch.Generator().manual_seed(1)),)
    return (_binary(32, 6, 1),)


BUILDERS = {
    "vae": lambda: VAE(6, 2, hidden=(8,)),
    "cvae": lambda: CVAE(6, 5, 2, hidden=(8,)),
    "hierarchical": lambda: HierarchicalVAE(6, z_dims=(3, 2), hidden=((8,), (8,))),
    "multimodal": lambda: MultimodalVAE(
        {
            "image": {"dim": 6, "likelihood": "bernoulli"},
            "signal": {"dim": 3, "likelihood": "gaussian"},
        },
        z_dim=2,
        hidden=(8,),
    ),
    "ard": lambda: ARDVAE(6, 3, hidden=(8,)),
}


def _own_tensors(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def _traced_params(model_module, data) -> dict[str, torch.Tensor]:
    guide_trace = poutine.trace(model_module.guide).get_trace(*data)
    model_trace = poutine.trace(poutine.replay(model_module.model, guide_trace)).get_trace(*data)
    found = {}
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                found[name] = site["value"].unconstrained()
    return found


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_two_default_models_train_their_own_parameters(kind):
    data = _data(kind)
    first = BUILDERS[kind]()
    pvae.fit(first.model, first.guide, data, epochs=1, batch_size=16, lr=1e-2, progress=False)
    before = {name: p.detach().clone() for name, p in first.named_parameters()}

    second = BUILDERS[kind]()
    fresh = {name: p.detach().clone() for name, p in second.named_parameters()}
    # Every parameter the second pair traces through its modules is one of its own tensors.
    own = _own_tensors(second)
    for name, value in _traced_params(second, data).items():
        if name.startswith(f"{second._pyro_name}.") and "prior_variance" not in name:
            assert id(value) in own, f"{name} is not {kind}'s own tensor"
    pvae.fit(second.model, second.guide, data, epochs=1, batch_size=16, lr=1e-2, progress=False)

    changed = [n for n, p in second.named_parameters() if not torch.equal(p, fresh[n])]
    decoder = [n for n in changed if "decoder" in n or "generation" in n]
    assert decoder, f"the second {kind}'s decoder did not train"
    for name, p in first.named_parameters():
        assert torch.equal(p, before[name]), f"the first {kind}'s {name} changed"


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
