"""Network building blocks: shapes with leading batch dimensions, positive scales, gradients,
the decoders' (x_dim, param_size) output layout, and the factories' argument checks."""

import itertools
import math

import pyro
import pytest
import torch
from torch import nn

import pvae.likelihoods as likelihoods
from pvae.nets import (
    MIN_SCALE,
    MLP,
    ConvDecoder,
    ConvEncoder,
    GaussianHead,
    GRUEncoder,
    MLPDecoder,
    MLPEncoder,
    build_decoder,
    build_encoder,
)

Z_DIM = 3
LEADING = [(), (4,), (2, 3)]
IMAGE_SHAPES = [(1, 28, 28), (1, 8, 8), (3, 7, 5)]


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


def _assert_all_grads(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def _check_encoder(encoder: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...]) -> None:
    x = x.clone().requires_grad_(True)
    loc, scale = encoder(x)
    assert loc.shape == out_shape
    assert scale.shape == out_shape
    assert (scale >= MIN_SCALE).all()
    (loc.sum() + scale.log().sum()).backward()
    _assert_all_grads(encoder)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mlp_shapes_and_structure():
    mlp = MLP(6, (8, 9), 4, activation=nn.Tanh)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 8), (8, 9), (9, 4)]
    assert sum(isinstance(m, nn.Tanh) for m in mlp.modules()) == 2
    assert not isinstance(list(mlp.layers)[-1], nn.Tanh)  # no activation on the output
    for leading in LEADING:
        assert mlp(torch.randn(*leading, 6)).shape == (*leading, 4)
    assert MLP(6, (), 4)(torch.randn(5, 6)).shape == (5, 4)
    # outputs can be negative: no activation on the output
    assert (MLP(6, (8,), 4)(torch.randn(100, 6)) < 0).any()


def test_gaussian_head_scale_is_softplus():
    head = GaussianHead(4, Z_DIM)
    h = torch.randn(5, 4)
    loc, scale = head(h)
    raw = head.linear(h)
    torch.testing.assert_close(loc, raw[..., :Z_DIM])
    torch.testing.assert_close(scale, nn.functional.softplus(raw[..., Z_DIM:]) + MIN_SCALE)
    # very negative raw outputs still give a positive scale
    with torch.no_grad():
        head.linear.bias.fill_(-1e4)
        head.linear.weight.zero_()
    assert (head(h)[1] > 0).all()


@pytest.mark.parametrize("leading", LEADING)
def test_mlp_encoder_decoder(leading):
    x_dim = 10
    _check_encoder(
        MLPEncoder(x_dim, Z_DIM, hidden=(16, 8)), torch.randn(*leading, x_dim), (*leading, Z_DIM)
    )
    decoder = MLPDecoder(Z_DIM, 2 * x_dim, hidden=(8,))
    out = decoder(torch.randn(*leading, Z_DIM))
    assert out.shape == (*leading, 2 * x_dim)
    out.sum().backward()
    _assert_all_grads(decoder)


def test_mlp_encoder_without_hidden_layers():
    loc, scale = MLPEncoder(10, Z_DIM, hidden=())(torch.randn(4, 10))
    assert loc.shape == scale.shape == (4, Z_DIM)


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("leading", LEADING)
def test_conv_encoder(image_shape, leading):
    x_dim = math.prod(image_shape)
    encoder = ConvEncoder(image_shape, Z_DIM, channels=(4, 8), hidden=16)
    _check_encoder(encoder, torch.rand(*leading, x_dim), (*leading, Z_DIM))


def test_conv_encoder_matches_per_example():
    """Flattening leading dimensions does not mix examples."""
    encoder = ConvEncoder((1, 8, 8), Z_DIM, channels=(4,), hidden=(16,))
    x = torch.rand(2, 3, 64)
    loc, scale = encoder(x)
    loc_01, scale_01 = encoder(x[0, 1])
    torch.testing.assert_close(loc[0, 1], loc_01)
    torch.testing.assert_close(scale[0, 1], scale_01)


def test_conv_encoder_rejects_wrong_size():
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        ConvEncoder((1, 8, 8), Z_DIM)(torch.rand(5, 63))


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("param_size", [1, 3])
def test_conv_decoder(image_shape, leading, param_size):
    x_dim = math.prod(image_shape)
    decoder = ConvDecoder(
        Z_DIM, image_shape, out_channels_per_pixel=param_size, channels=(8, 4), hidden=16
    )
    out = decoder(torch.randn(*leading, Z_DIM))
    assert out.shape == (*leading, x_dim * param_size)
    out.square().sum().backward()
    _assert_all_grads(decoder)


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
def test_conv_decoder_layout(image_shape):
    """Output element ((c * H + h) * W + w) * P + p is last-layer channel (c, p) at (h, w)."""
    num_channels, height, width = image_shape
    param_size = 2
    decoder = ConvDecoder(
        Z_DIM, image_shape, out_channels_per_pixel=param_size, channels=(4,), hidden=8
    )
    captured = {}
    last = list(decoder.deconvs)[-1]
    last.register_forward_hook(lambda module, inputs, output: captured.update(raw=output))
    out = decoder(torch.randn(2, Z_DIM))
    raw = captured["raw"]  # (batch, C * P, >= H, >= W)
    assert raw.shape[:2] == (2, num_channels * param_size)
    grid = raw[..., :height, :width].reshape(2, num_channels, param_size, height, width)
    params = out.reshape(2, num_channels * height * width, param_size)  # likelihood's view
    for c, h, w, p in itertools.product(
        range(num_channels), range(height), range(width), range(param_size)
    ):
        pixel = (c * height + h) * width + w
        assert params[:, pixel, p].equal(grid[:, c, p, h, w])


def test_conv_decoder_feeds_categorical_likelihood():
    lik = likelihoods.get("categorical", 64, num_categories=5)
    decoder = build_decoder("conv", Z_DIM, 64, (16,), lik.param_size, image_shape=(1, 8, 8))
    d = lik(decoder(torch.randn(2, 3, Z_DIM))).to_event(1)
    assert d.batch_shape == (2, 3)
    assert d.event_shape == (64,)
    assert d.log_prob(torch.randint(0, 5, (2, 3, 64))).shape == (2, 3)


@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_encoder_final_state(leading, bidirectional):
    encoder = GRUEncoder(4, Z_DIM, hidden_size=8, bidirectional=bidirectional)
    _check_encoder(encoder, torch.randn(*leading, 6, 4), (*leading, Z_DIM))


@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_encoder_per_step(leading, bidirectional):
    encoder = GRUEncoder(4, Z_DIM, hidden_size=8, per_step=True, bidirectional=bidirectional)
    _check_encoder(encoder, torch.randn(*leading, 6, 4), (*leading, 6, Z_DIM))


def test_gru_encoder_final_state_reads_whole_sequence():
    """The unidirectional final state depends on the first step; per-step outputs are causal."""
    x = torch.randn(2, 6, 4)
    y = x.clone()
    y[:, 0] += 1.0
    final = GRUEncoder(4, Z_DIM, hidden_size=8)
    assert not torch.allclose(final(x)[0], final(y)[0])
    per_step = GRUEncoder(4, Z_DIM, hidden_size=8, per_step=True)
    z = x.clone()
    z[:, -1] += 1.0
    torch.testing.assert_close(per_step(x)[0][:, :-1], per_step(z)[0][:, :-1])
    # bidirectional: the first step's output sees the last step
    both = GRUEncoder(4, Z_DIM, hidden_size=8, per_step=True, bidirectional=True)
    assert not torch.allclose(both(x)[0][:, 0], both(z)[0][:, 0])


def test_gru_encoder_rejects_wrong_input_dim():
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 4\)"):
        GRUEncoder(4, Z_DIM)(torch.randn(2, 6, 5))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("image_shape", [(1, 28, 28), (1, 8, 8)])
def test_factories(kind, image_shape):
    x_dim = math.prod(image_shape)
    encoder = build_encoder(kind, x_dim, Z_DIM, (16,), image_shape=image_shape)
    assert isinstance(encoder, MLPEncoder if kind == "mlp" else ConvEncoder)
    loc, scale = encoder(torch.rand(2, 3, x_dim))
    assert loc.shape == scale.shape == (2, 3, Z_DIM)
    decoder = build_decoder(kind, Z_DIM, x_dim, (16,), 2, image_shape=image_shape)
    assert isinstance(decoder, MLPDecoder if kind == "mlp" else ConvDecoder)
    assert decoder(loc).shape == (2, 3, 2 * x_dim)


def test_factories_reject_bad_arguments():
    with pytest.raises(ValueError, match="needs image_shape"):
        build_encoder("conv", 64, Z_DIM, (16,))
    with pytest.raises(ValueError, match="needs image_shape"):
        build_decoder("conv", Z_DIM, 64, (16,), 1)
    with pytest.raises(ValueError, match=r"has 784 pixels but x_dim=64"):
        build_encoder("conv", 64, Z_DIM, (16,), image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"has 784 pixels but x_dim=64"):
        build_decoder("conv", Z_DIM, 64, (16,), 1, image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"three positive ints"):
        build_encoder("conv", 64, Z_DIM, (16,), image_shape=(8, 8))
    with pytest.raises(ValueError, match=r"valid kinds are: conv, mlp"):
        build_encoder("rnn", 64, Z_DIM, (16,))
    with pytest.raises(ValueError, match=r"valid kinds are: conv, mlp"):
        build_decoder("rnn", Z_DIM, 64, (16,), 1)
    with pytest.raises(ValueError, match="hidden widths"):
        build_encoder("mlp", 64, Z_DIM, (16, 0))
