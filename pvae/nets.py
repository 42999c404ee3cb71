"""Small network building blocks: MLPs, conv and recurrent encoders/decoders.

Every module accepts arbitrary leading batch dimensions, e.g. ``(num_particles, batch, ...)``;
conv and recurrent modules flatten them internally and restore them on output.

Encoders return the parameters of a diagonal Gaussian, ``(loc, scale)``, with
``scale = softplus(raw) + MIN_SCALE`` (softplus rather than ``exp``: it grows linearly, so a
large raw output cannot overflow the scale or blow up gradients; ``MIN_SCALE = 1e-6`` keeps it
strictly positive).

Decoders return a flat tensor ``(..., x_dim * param_size)`` laid out as ``(x_dim, param_size)``:
the ``param_size`` outputs that belong to data dimension ``i`` are contiguous, which is how
:mod:`pvae.likelihoods` reads them (``params.reshape(..., x_dim, param_size)``). For images
``x_dim = C * H * W`` with pixels flattened in ``(C, H, W)`` order, as ``x.reshape(-1)`` does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MIN_SCALE",
    "MLP",
    "GaussianHead",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "GRUEncoder",
    "InputConvexNetwork",
    "InverseLipschitzDecoder",
    "build_encoder",
    "build_decoder",
    "build_frame_networks",
    "conv_image_shape",
    "require_mlp",
]

MIN_SCALE = 1e-6
"""Added to ``softplus(raw)`` so that encoder scales are strictly positive."""

ImageShape = tuple[int, int, int]


def conv_image_shape(ds: Any, net: str) -> ImageShape | None:
    """``(C, H, W)``, the ``image_shape`` of the dataset ``ds`` (anything with ``image_shape``
    and ``name``, e.g. :class:`pvae.data.Splits`) for ``net="conv"``; None for another net.

    :raises ValueError: for ``conv`` on a dataset without a 3-d ``image_shape``.
    """
    if net != "conv":
        return None
    if ds.image_shape is None or len(ds.image_shape) != 3:
        raise ValueError(
            f"net 'conv' needs an image dataset; {ds.name!r} has no (channels, height, width) "
            "image_shape: use net 'mlp'"
        )
    channels, height, width = ds.image_shape
    return (channels, height, width)


def require_mlp(model: str, net: str) -> None:
    """:raises ValueError: when ``net`` is not ``mlp`` for the ``model`` that has MLPs only."""
    if net != "mlp":
        raise ValueError(f"model {model!r} has MLP networks only: use --net mlp, not {net!r}")


def _positive_ints(values: Sequence[int]) -> tuple[int, ...] | None:
    """``values`` as a tuple of Python ints, or ``None`` if one is not a positive integer."""
    try:
        ints = tuple(operator.index(v) for v in values if not isinstance(v, bool))
    except TypeError:
        return None
    if len(ints) != len(values) or any(v < 1 for v in ints):
        return None
    return ints


def _as_hidden(hidden: int | Sequence[int]) -> tuple[int, ...]:
    values = [hidden] if not isinstance(hidden, Sequence) else list(hidden)
    widths = _positive_ints(values)
    if widths is None:
        raise ValueError(f"hidden widths must be positive ints, got {hidden!r}")
    return widths


def _check_image_shape(image_shape: Sequence[int], name: str = "image_shape") -> ImageShape:
    shape = _positive_ints(list(image_shape))
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"{name} must be (channels, height, width), three positive ints, got {image_shape!r}"
        )
    return (shape[0], shape[1], shape[2])


def _hidden_layers(
    in_dim: int, hidden: Sequence[int], activation: type[nn.Module]
) -> tuple[list[nn.Module], int]:
    """``Linear -> activation`` for each width in ``hidden``; returns the layers and last width."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation()]
        in_dim = width
    return layers, in_dim


class MLP(nn.Module):
    """Fully connected network: ``Linear`` layers with ``activation`` between, none on output.

    :param in_dim: input size.
    :param hidden: widths of the hidden layers (may be empty: a single ``Linear``).
    :param out_dim: output size.
    :param activation: activation class, instantiated once per hidden layer.

    Shapes: ``(..., in_dim) -> (..., out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers, width = _hidden_layers(in_dim, _as_hidden(hidden), activation)
        self.layers = nn.Sequential(*layers, nn.Linear(width, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return out


class GaussianHead(nn.Module):
    """Linear map to the parameters of a diagonal Gaussian.

    ``loc, raw = Linear(in_dim, 2 * z_dim)(h).chunk(2)`` and ``scale = softplus(raw) + MIN_SCALE``.

    Shapes: ``(..., in_dim) -> ((..., z_dim), (..., z_dim))``.
    """

    def __init__(self, in_dim: int, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.linear = nn.Linear(in_dim, 2 * z_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = self.linear(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_SCALE


class MLPEncoder(nn.Module):
    """MLP encoder ``x -> (loc, scale)`` of a diagonal Gaussian over ``z``.

    Shapes: ``(..., x_dim) -> ((..., z_dim), (..., z_dim))``; ``scale > 0``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers, width = _hidden_layers(x_dim, _as_hidden(hidden), activation)
        self.body = nn.Sequential(*layers)
        self.head = GaussianHead(width, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale = self.head(self.body(x))
        return loc, scale


class MLPDecoder(MLP):
    """MLP decoder ``z -> params``; no activation on the output.

    Shapes: ``(..., z_dim) -> (..., out_dim)``; use ``out_dim = x_dim * param_size``.
    """

    def __init__(
        self,
        z_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(z_dim, hidden, out_dim, activation)


class ConvEncoder(nn.Module):
    """Convolutional encoder for flattened images ``x -> (loc, scale)``.

    ``Conv2d(kernel 3, stride 2, padding 1) -> activation`` per entry of ``channels`` (each halves
    height and width, rounding up: 28 -> 14 -> 7, 8 -> 4 -> 2), then fully connected layers of
    widths ``hidden`` and a :class:`GaussianHead`.

    :param image_shape: ``(C, H, W)``.
    :param z_dim: latent size.
    :param channels: output channels of the successive convolutions.
    :param hidden: width(s) of the fully connected layer(s) after the convolutions.
    :param activation: activation class.

    Shapes: ``(..., C * H * W) -> ((..., z_dim), (..., z_dim))``, input flattened in
    ``(C, H, W)`` order.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden: int | Sequence[int] = 256,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.x_dim = math.prod(self.image_shape)
        convs: list[nn.Module] = []
        in_channels = self.image_shape[0]
        for out_channels in channels:
            convs += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), activation()]
            in_channels = out_channels
        self.convs = nn.Sequential(*convs, nn.Flatten())
        with torch.no_grad():
            flat_size = self.convs(torch.zeros(1, *self.image_shape)).shape[-1]
        layers, width = _hidden_layers(flat_size, _as_hidden(hidden), activation)
        self.fc = nn.Sequential(*layers)
        self.head = GaussianHead(width, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"ConvEncoder expects x of shape (..., {self.x_dim}) for images "
                f"{self.image_shape}, got {tuple(x.shape)}"
            )
        batch_shape = x.shape[:-1]
        h = self.convs(x.reshape(-1, *self.image_shape))
        loc, scale = self.head(self.fc(h))
        return loc.reshape(*batch_shape, -1), scale.reshape(*batch_shape, -1)


class ConvDecoder(nn.Module):
    """Transposed-convolution decoder ``z -> params`` for images.

    Fully connected layers of widths ``hidden`` map ``z`` to ``channels[0]`` feature maps of
    size ``(ceil(H / 2**n), ceil(W / 2**n))``, ``n = len(channels)``. Each of the ``n``
    ``ConvTranspose2d(kernel 4, stride 2, padding 1)`` doubles height and width (activation
    between, none after the last); the result is cropped to ``(H, W)``. The last layer has
    ``C * out_channels_per_pixel`` channels, grouped ``(C, out_channels_per_pixel)``.

    The output is flattened to ``(..., C * H * W * P)`` in the layout ``(x_dim, P)`` of
    :mod:`pvae.likelihoods`, ``P = out_channels_per_pixel``: element
    ``[..., ((c * H + h) * W + w) * P + p]`` is parameter ``p`` of pixel ``(c, h, w)``.

    :param z_dim: latent size.
    :param image_shape: ``(C, H, W)``.
    :param out_channels_per_pixel: the likelihood's ``param_size``.
    :param channels: feature channels entering the successive transposed convolutions.
    :param hidden: width(s) of the fully connected layer(s) before the convolutions.
    :param activation: activation class.

    Shapes: ``(..., z_dim) -> (..., C * H * W * out_channels_per_pixel)``.
    """

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        out_channels_per_pixel: int = 1,
        channels: Sequence[int] = (64, 32),
        hidden: int | Sequence[int] = 256,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        channels = tuple(channels)
        if not channels:
            raise ValueError("ConvDecoder needs at least one entry in channels")
        if out_channels_per_pixel < 1:
            raise ValueError(
                f"out_channels_per_pixel must be a positive int, got {out_channels_per_pixel!r}"
            )
        self.out_channels_per_pixel = out_channels_per_pixel
        num_channels, height, width = self.image_shape
        scale = 2 ** len(channels)
        self.start_shape = (channels[0], -(-height // scale), -(-width // scale))
        layers, fc_width = _hidden_layers(z_dim, _as_hidden(hidden), activation)
        self.fc = nn.Sequential(
            *layers, nn.Linear(fc_width, math.prod(self.start_shape)), activation()
        )
        deconvs: list[nn.Module] = []
        outs = (*channels[1:], num_channels * out_channels_per_pixel)
        for i, (in_channels, out_channels) in enumerate(zip(channels, outs, strict=True)):
            deconvs.append(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                deconvs.append(activation())
        self.deconvs = nn.Sequential(*deconvs)

    def forward(self, z: Tensor) -> Tensor:
        batch_shape = z.shape[:-1]
        num_channels, height, width = self.image_shape
        h = self.fc(z).reshape(-1, *self.start_shape)
        out = self.deconvs(h)[..., :height, :width]  # (B, C * P, H, W)
        out = out.reshape(-1, num_channels, self.out_channels_per_pixel, height, width)
        out = out.permute(0, 1, 3, 4, 2)  # (B, C, H, W, P)
        return out.reshape(*batch_shape, -1)


class GRUEncoder(nn.Module):
    """GRU encoder for sequences ``x_{1:T} -> (loc, scale)``.

    With ``per_step=False`` the head reads the last output (the final state), giving one
    Gaussian per sequence; with ``per_step=True`` it reads every step, giving one per time step
    (e.g. per-step potentials for a state-space guide). ``bidirectional=True`` lets each step
    see the whole sequence; the final state is then the last forward output concatenated with
    the first backward output.

    :param input_dim: features per time step.
    :param z_dim: latent size.
    :param hidden_size: GRU hidden size (per direction).
    :param per_step: one Gaussian per time step instead of per sequence.
    :param num_layers: stacked GRU layers.
    :param bidirectional: run a backward GRU as well.

    Shapes: ``(..., T, input_dim) -> ((..., z_dim), (..., z_dim))``, or
    ``((..., T, z_dim), (..., T, z_dim))`` when ``per_step``.
    """

    def __init__(
        self,
        input_dim: int,
        z_dim: int,
        hidden_size: int = 64,
        per_step: bool = False,
        num_layers: int = 1,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.per_step = per_step
        self.bidirectional = bidirectional
        self.hidden_size = hidden_size
        self.gru = nn.GRU(
            input_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
        )
        self.head = GaussianHead(hidden_size * (2 if bidirectional else 1), z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 2 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"GRUEncoder expects x of shape (..., T, {self.input_dim}), got {tuple(x.shape)}"
            )
        batch_shape, num_steps = x.shape[:-2], x.shape[-2]
        outputs, _ = self.gru(x.reshape(-1, num_steps, self.input_dim))  # (B, T, D * hidden)
        if self.per_step:
            h = outputs.reshape(*batch_shape, num_steps, -1)
        elif self.bidirectional:
            h = torch.cat(
                [outputs[:, -1, : self.hidden_size], outputs[:, 0, self.hidden_size :]], dim=-1
            ).reshape(*batch_shape, -1)
        else:
            h = outputs[:, -1].reshape(*batch_shape, -1)
        loc, scale = self.head(h)
        return loc, scale


class InputConvexNetwork(nn.Module):
    """A scalar input-convex network psi(z) (Amos et al. 2017).

    ``u_1 = softplus(A_0 z + b_0)``, ``u_{k+1} = softplus(W_k u_k + A_k z + b_k)``, ``psi =
    w^T u_K + a^T z``, with the weights ``W_k`` and ``w`` on the path through the hidden
    units non-negative (``softplus`` of free parameters). Softplus is convex and non-decreasing,
    and non-negative sums of convex functions are convex, so ``psi`` is convex in ``z``.

    Shapes: ``(..., z_dim) -> (...)``.
    """

    def __init__(self, z_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        widths = _as_hidden(hidden)
        if not widths:
            raise ValueError("InputConvexNetwork needs at least one hidden layer")
        self.skips = nn.ModuleList(nn.Linear(z_dim, width) for width in widths)
        self.raw_weights = nn.ParameterList(
            nn.Parameter(torch.randn(out, inp) / math.sqrt(inp) - 2.0)
            for inp, out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.raw_out = nn.Parameter(torch.randn(widths[-1]) / math.sqrt(widths[-1]) - 2.0)
        self.linear_out = nn.Linear(z_dim, 1, bias=False)

    def forward(self, z: Tensor) -> Tensor:
        u = F.softplus(self.skips[0](z))
        for skip, raw in zip(self.skips[1:], self.raw_weights, strict=True):
            u = F.softplus(u @ F.softplus(raw).T + skip(z))
        out: Tensor = u @ F.softplus(self.raw_out) + self.linear_out(z).squeeze(-1)
        return out


class InverseLipschitzDecoder(nn.Module):
    """Decoder with a controllable inverse-Lipschitz constant (Kinoshita et al., ICML 2023).

    ``params = h(grad psi(z))`` with ``psi(z) = ICNN(z) + (L / 2) ||z||^2``: the ICNN is
    convex (:class:`InputConvexNetwork`), so ``psi`` is ``L``-strongly convex and its gradient
    map is ``L``-strongly monotone,

        ||grad psi(z) - grad psi(z')|| >= L ||z - z'||,

    i.e. inverse Lipschitz with constant ``L``: distinct latents give distinct decoder
    features, which bounds from below how far the posterior must move from the prior to
    explain a datapoint (a remedy for posterior collapse; ``L = 0`` removes the guarantee).
    ``h`` is an MLP of widths ``hidden`` (``hidden=()``: one ``Linear``); the whole decoder
    keeps the guarantee when ``h`` is itself inverse Lipschitz (e.g. a linear ``h`` of full
    column rank); an MLP ``h`` is not constrained.

    The gradient is taken with ``torch.autograd.grad(create_graph=True)`` inside ``forward``,
    so training differentiates through it; it works under ``torch.no_grad`` too.

    :param z_dim: latent size.
    :param out_dim: output size (``x_dim * param_size`` for a likelihood).
    :param hidden: widths of the MLP ``h``.
    :param lipschitz: the inverse-Lipschitz constant ``L >= 0`` of ``grad psi``.
    :param icnn_hidden: hidden widths of the ICNN.
    :param activation: activation class of ``h``.

    Shapes: ``(..., z_dim) -> (..., out_dim)``.
    """

    def __init__(
        self,
        z_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (200, 200),
        lipschitz: float = 1.0,
        icnn_hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if not (math.isfinite(lipschitz) and lipschitz >= 0):
            raise ValueError(f"lipschitz must be a finite number >= 0, got {lipschitz!r}")
        self.z_dim = z_dim
        self.lipschitz = float(lipschitz)
        self.icnn = InputConvexNetwork(z_dim, icnn_hidden)
        self.h = MLP(z_dim, hidden, out_dim, activation)

    def gradient_map(self, z: Tensor) -> Tensor:
        """``grad psi(z) = grad ICNN(z) + L z``, ``(..., z_dim)``."""
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            point = z if z.requires_grad else z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.icnn(point).sum(), point, create_graph=outer_grad)
        if not outer_grad:
            grad = grad.detach()
        return grad + self.lipschitz * z

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.z_dim:
            raise ValueError(
                f"InverseLipschitzDecoder expects z of shape (..., {self.z_dim}), "
                f"got {tuple(z.shape)}"
            )
        out: Tensor = self.h(self.gradient_map(z))
        return out


_KINDS = ("conv", "mlp")


def _image_shape_for(kind: str, x_dim: int, image_shape: Sequence[int] | None) -> ImageShape:
    if image_shape is None:
        raise ValueError(f"kind={kind!r} needs image_shape=(channels, height, width)")
    shape = _check_image_shape(image_shape)
    if math.prod(shape) != x_dim:
        raise ValueError(
            f"image_shape {shape} has {math.prod(shape)} pixels but x_dim={x_dim}; "
            f"image_shape must multiply to x_dim"
        )
    return shape


def build_encoder(
    kind: str,
    x_dim: int,
    z_dim: int,
    hidden: int | Sequence[int] = (200, 200),
    image_shape: Sequence[int] | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Module:
    """Encoder ``(..., x_dim) -> (loc, scale)``, each ``(..., z_dim)``.

    :param kind: ``"mlp"`` (:class:`MLPEncoder`, hidden layers ``hidden``) or ``"conv"``
        (:class:`ConvEncoder`, default channels, fully connected layers ``hidden``).
    :param x_dim: data size.
    :param z_dim: latent size.
    :param hidden: hidden widths.
    :param image_shape: ``(C, H, W)`` with ``C * H * W == x_dim``; required for ``"conv"``.
    :param activation: activation class.
    """
    if kind == "mlp":
        return MLPEncoder(x_dim, z_dim, _as_hidden(hidden), activation)
    if kind == "conv":
        shape = _image_shape_for(kind, x_dim, image_shape)
        return ConvEncoder(shape, z_dim, hidden=hidden, activation=activation)
    raise ValueError(f"unknown encoder kind {kind!r}; valid kinds are: {', '.join(_KINDS)}")


def build_decoder(
    kind: str,
    z_dim: int,
    x_dim: int,
    hidden: int | Sequence[int] = (200, 200),
    param_size: int = 1,
    image_shape: Sequence[int] | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Module:
    """Decoder ``(..., z_dim) -> (..., x_dim * param_size)``, laid out as ``(x_dim, param_size)``.

    :param kind: ``"mlp"`` (:class:`MLPDecoder`) or ``"conv"`` (:class:`ConvDecoder`, default
        channels, fully connected layers ``hidden``).
    :param z_dim: latent size.
    :param x_dim: data size.
    :param hidden: hidden widths.
    :param param_size: outputs per data dimension, the likelihood's ``param_size``.
    :param image_shape: ``(C, H, W)`` with ``C * H * W == x_dim``; required for ``"conv"``.
    :param activation: activation class.
    """
    if kind == "mlp":
        return MLPDecoder(z_dim, x_dim * param_size, _as_hidden(hidden), activation)
    if kind == "conv":
        shape = _image_shape_for(kind, x_dim, image_shape)
        return ConvDecoder(
            z_dim, shape, out_channels_per_pixel=param_size, hidden=hidden, activation=activation
        )
    raise ValueError(f"unknown decoder kind {kind!r}; valid kinds are: {', '.join(_KINDS)}")


def build_frame_networks(
    net: str,
    x_dim: int,
    z_dim: int,
    hidden: int | Sequence[int],
    param_size: int = 1,
    image_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The per-frame encoder and decoder of a sequence model: :func:`build_encoder` and
    :func:`build_decoder` of kind ``net`` (``"mlp"`` or ``"conv"``, the decoder's hidden widths
    mirrored), or ``"linear"``: an MLP encoder and a linear decoder ``z -> x`` (the
    linear-Gaussian emission of the exact-truth tests).

    :returns: ``(encoder, decoder)``.
    """
    encoder = build_encoder(
        "mlp" if net == "linear" else net, x_dim, z_dim, hidden, image_shape=image_shape
    )
    if net == "linear":
        return encoder, nn.Linear(z_dim, x_dim)
    mirrored = tuple(reversed(_as_hidden(hidden)))
    return encoder, build_decoder(net, z_dim, x_dim, mirrored, param_size, image_shape)
