"""An autoregressive prior over latent paths: ``p(z_t | z_<t)`` Gaussian, driven by a GRU.

:class:`SequentialPrior` is the distribution over whole paths (event shape ``(T, k)``) that the
Koopman VAE's model samples; :class:`PriorNet` holds its GRU and Gaussian head.
"""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor, nn
from torch.distributions import constraints

__all__ = ["PriorNet", "SequentialPrior"]


class PriorNet(nn.Module):
    """The sequential prior's GRU and Gaussian head: ``h_t = GRU(z_{t-1}, h_{t-1})``,
    ``(mu_t, sigma_t) = head(h_t)``."""

    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.gru = nn.GRU(z_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2 * z_dim)

    def _gaussian(self, h: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = self.head(h).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4

    def conditionals(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu_t, sigma_t)`` of ``p(z_t | z_<t)`` at a path ``z (..., T, k)`` (teacher
        forcing: one GRU pass over ``[0, z_1..z_{T-1}]``)."""
        lead = z.shape[:-2]
        flat = z.reshape(-1, *z.shape[-2:])
        shifted = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1)
        out, _ = self.gru(shifted)
        loc, scale = self._gaussian(out)
        scale = self._step_scales(scale, 0)
        return loc.reshape(*lead, *loc.shape[1:]), scale.reshape(*lead, *scale.shape[1:])

    def _step_scales(self, scale: Tensor, first: int) -> Tensor:
        """The scales of steps ``first, first + 1, ...`` (``scale (..., steps, k)``): the
        head's, here; a subclass may fix some (every path through the prior asks this)."""
        return scale

    def rollout(self, num_paths: int, num_steps: int, noise_scale: float = 1.0) -> Tensor:
        """``(num_paths, num_steps, k)`` reparameterised paths drawn from the prior; with
        ``noise_scale`` each step's noise is ``noise_scale sigma(h_t)`` (1: the prior itself)."""
        weight = self.head.weight
        z = weight.new_zeros(num_paths, 1, self.z_dim)
        hidden = None
        steps = []
        for t in range(num_steps):
            out, hidden = self.gru(z, hidden)
            loc, scale = self._gaussian(out)
            z = loc + noise_scale * self._step_scales(scale, t) * torch.randn_like(loc)
            steps.append(z)
        return torch.cat(steps, 1)

    def continue_means(self, path: Tensor, num_steps: int) -> Tensor:
        """The mean path after ``path (B, T, k)``: ``(B, num_steps, k)``, each step the mean
        ``mu(h_t)`` of ``p(z_t | z_<t)`` with the GRU run over ``path`` and then over its own
        means (a plug-in rollout; the exact predictive mean of the nonlinear prior differs)."""
        inputs = torch.cat([torch.zeros_like(path[:, :1]), path], 1)
        out, hidden = self.gru(inputs)
        loc, _ = self._gaussian(out[:, -1:])
        means = [loc]
        for _ in range(num_steps - 1):
            out, hidden = self.gru(loc, hidden)
            loc, _ = self._gaussian(out)
            means.append(loc)
        return torch.cat(means, 1)


class SequentialPrior(TorchDistribution):
    """``p(z_1..z_T) = prod_t N(z_t | mu(h_t), sigma(h_t))`` with ``h_t`` a GRU over ``z_<t``.

    Batch shape ``batch_shape``, event shape ``(T, k)``. ``log_prob`` teacher-forces the GRU
    on the value's own past (so replayed on a guide's draw it scores the draw's path);
    ``rsample`` rolls the prior out step by step.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        net: PriorNet,
        num_steps: int,
        batch_shape: Any = (),
        validate_args: Any = None,  # noqa: ARG002 (Pyro's signature)
    ) -> None:
        self.net = net
        self.num_steps = int(num_steps)
        super().__init__(
            torch.Size(batch_shape), torch.Size([self.num_steps, net.z_dim]), validate_args=False
        )

    def expand(self, batch_shape, _instance=None):
        return SequentialPrior(self.net, self.num_steps, torch.Size(batch_shape))

    def rsample(self, sample_shape: Any = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        paths = self.net.rollout(max(1, math.prod(shape)), self.num_steps)
        return paths[: math.prod(shape)].reshape(*shape, *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.log_prob_elements(value).sum((-2, -1))

    def log_prob_elements(self, value: Tensor) -> Tensor:
        """log p(z_tc | z_<t) per element, ``batch + (T, k)`` (they sum to :meth:`log_prob`;
        per-channel collapse diagnostics read them)."""
        loc, scale = self.net.conditionals(value)
        return dist.Normal(loc, scale).log_prob(value)
