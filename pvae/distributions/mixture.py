"""Equal-weight mixtures of diagonal Gaussians with stratified draws: the mixture guide of
the multimodal VAE's MoE and MoPoE fusions (Shi et al. 2019; Sutter et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor

__all__ = ["DENSITIES", "StratifiedMixture"]

DENSITIES = ("mixture", "component")


class StratifiedMixture(TorchDistribution):
    """An equal-weight mixture of diagonal Gaussians over the valid components, with
    stratified reparameterised draws.

    :param loc, scale: ``(batch, C, D)``: the components.
    :param valid: ``(batch, C)`` bool, at least one True per row: the components that take
        part (uniform weights 1/n over the n valid ones).
    :param shift: ``(batch,)`` in [0, 1): the random cyclic shift of the valid components
        (drawn once, when the guide builds the distribution).
    :param density: "mixture": :meth:`log_prob` is log (1/n) sum_c N(z; loc_c, scale_c);
        "component": the log-density of the component that drew the value (by its position).
    :param stratified: False draws every replicate's component independently ("mixture" only).

    Batch shape ``(batch,)``, event shape ``(D,)``. A draw of ``sample_shape`` has
    ``R = prod(sample_shape)`` replicates per datapoint (under Pyro's particle plate the
    particles are the replicates); replicate r of datapoint b comes from the valid component of
    rank ``(floor(r n_b / R) + floor(shift_b n_b)) mod n_b``: contiguous blocks, one per
    component, after the shift. ``mean`` and ``variance`` are the mixture's.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        valid: Tensor,
        shift: Tensor,
        density: str = "mixture",
        stratified: bool = True,
    ):
        if density not in DENSITIES:
            raise ValueError(f"unknown density {density!r}; valid densities: {DENSITIES}")
        if density == "component" and not stratified:
            raise ValueError(
                "density='component' needs stratified=True: the component of a value is read "
                "from its position"
            )
        if loc.dim() < 2 or loc.shape != scale.shape or valid.shape != loc.shape[:-1]:
            raise ValueError(
                f"loc and scale must be (batch, C, D) and valid (batch, C), got "
                f"{tuple(loc.shape)}, {tuple(scale.shape)}, {tuple(valid.shape)}"
            )
        self.loc, self.scale, self.valid, self.shift = loc, scale, valid.bool(), shift
        self.density, self.stratified = density, stratified
        super().__init__(loc.shape[:-2], loc.shape[-1:], validate_args=False)

    @property
    def num_valid(self) -> Tensor:
        """Valid components per datapoint, ``(batch,)``."""
        return self.valid.sum(-1)

    def components(self, num_replicates: int) -> Tensor:
        """The component index of each replicate, ``(R, batch)`` (stratified layout)."""
        count = self.num_valid
        base = self.batch_shape
        if self.stratified:
            r = torch.arange(num_replicates, device=count.device)
            r = r.reshape((num_replicates,) + (1,) * len(base))
            offset = torch.floor(self.shift * count).long()
            rank = torch.div(r * count, num_replicates, rounding_mode="floor") + offset
        else:
            uniform = torch.rand((num_replicates,) + base, device=count.device)
            rank = torch.floor(uniform * count).long()
        rank = torch.remainder(rank, count)
        # Valid components first, in their order: the rank-th of them.
        order = torch.argsort((~self.valid).to(torch.int8), dim=-1, stable=True)
        order = order.expand((num_replicates,) + order.shape)
        return order.gather(-1, rank.unsqueeze(-1)).squeeze(-1)

    def _selected(self, components: Tensor) -> tuple[Tensor, Tensor]:
        """loc and scale of the given components ``(R, batch)`` -> ``(R, batch, D)`` each."""
        shape = components.shape + (1, self.loc.shape[-1])
        index = components[..., None, None].expand(shape)
        loc = self.loc.expand(components.shape[:1] + self.loc.shape)
        scale = self.scale.expand(components.shape[:1] + self.scale.shape)
        return loc.gather(-2, index).squeeze(-2), scale.gather(-2, index).squeeze(-2)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        num_replicates = math.prod(sample_shape)
        loc, scale = self._selected(self.components(num_replicates))
        z = loc + scale * torch.randn_like(loc)
        return z.reshape(sample_shape + self.batch_shape + self.event_shape)

    def _laid_out_as_draws(self, value: Tensor) -> bool:
        """Whether ``value`` has the shape of a draw, ``sample_shape + batch + event``."""
        batch = len(self.batch_shape)
        return value.dim() > batch and value.shape[value.dim() - 1 - batch : -1] == (
            self.batch_shape
        )

    def log_prob(self, value: Tensor) -> Tensor:
        """The mixture's log-density; with ``density="component"``, values laid out as this
        distribution's draws get the log-density of the component of their position, and any
        other shape (a value broadcast against every datapoint's posterior, as the aggregate
        posterior of a mutual-information estimate is) the mixture's."""
        if self.density == "mixture" or not self._laid_out_as_draws(value):
            lp = dist.Normal(self.loc, self.scale).log_prob(value.unsqueeze(-2)).sum(-1)
            lp = torch.where(self.valid, lp, lp.new_tensor(-math.inf))
            return torch.logsumexp(lp, -1) - self.num_valid.to(lp.dtype).log()
        leading = value.shape[: value.dim() - 1 - len(self.batch_shape)]
        num_replicates = math.prod(leading)
        loc, scale = self._selected(self.components(num_replicates))
        flat = value.reshape(loc.shape)
        lp = dist.Normal(loc, scale).log_prob(flat).sum(-1)
        return lp.reshape(value.shape[:-1])

    def marginal_log_prob(self, value: Tensor) -> Tensor:
        """Log-densities of the mixture's 1-d marginals, ``(..., batch, D)``: dimension d of
        the mixture is the mixture of the components' N(loc_cd, scale_cd) (per-dimension
        diagnostics; the mixture itself does not factorise over dimensions)."""
        lp = dist.Normal(self.loc, self.scale).log_prob(value.unsqueeze(-2))  # (..., b, C, D)
        lp = torch.where(self.valid[..., None], lp, lp.new_tensor(-math.inf))
        return torch.logsumexp(lp, -2) - self.num_valid.to(lp.dtype).log()[..., None]

    @property
    def mean(self) -> Tensor:
        weights = self.valid.to(self.loc.dtype) / self.num_valid.to(self.loc.dtype)[..., None]
        return (weights[..., None] * self.loc).sum(-2)

    @property
    def variance(self) -> Tensor:
        weights = self.valid.to(self.loc.dtype) / self.num_valid.to(self.loc.dtype)[..., None]
        second = (weights[..., None] * (self.scale**2 + self.loc**2)).sum(-2)
        return second - self.mean**2
