"""Closed forms for posterior collapse in linear conditional VAEs (Dang et al., ICLR 2024,
"Beyond Vanilla Variational Autoencoders: Detecting Posterior Collapse in Conditional and
Hierarchical Variational Autoencoders").

The linear CVAE, for inputs x in R^{d_x} and outputs y in R^{d_y}, latent z in R^{d_z}:

    q(z | x, y) = N(W1 x + W2 y, Sigma)          Sigma diagonal, learnable
    p(z)        = N(0, eta_enc^2 I)
    p(y | x, z) = N(U1 z + U2 x, eta_dec^2 I)

trained on the beta-ELBO, loss = E_q ||y - U1 z - U2 x||^2 / (2 eta_dec^2) + beta KL (the
negative of ``pvae.inference.ELBO(beta=beta)`` up to a constant). With the second moments
Sxx = E[x x^T], Sxy = E[x y^T], Syy = E[y y^T], let theta_1 >= theta_2 >= ... be the
eigenvalues of the residual covariance of y given x,

    E = Syy - Syx Sxx^-1 Sxy.

At a global optimum, mode i (i <= min(d_z, d_y); the others are collapsed) has

    singular value of U1:   u_i     = sqrt(max(0, theta_i - beta eta_dec^2)) / eta_enc
    encoder std:            sigma_i = sqrt(beta) eta_enc eta_dec / sqrt(theta_i)   if
                                      theta_i > beta eta_dec^2, else eta_enc (collapsed)
    KL of that latent:      KL_i    = 0.5 log(theta_i / (beta eta_dec^2)) if active, else 0

so mode i collapses exactly when theta_i <= beta eta_dec^2: more correlation between x and y
lowers theta and causes more collapse. The KL line is not stated in the paper; it follows from
the optimum (per mode, E[mu^2] / eta_enc^2 = 1 - beta eta_dec^2 / theta_i and sigma_i^2 /
eta_enc^2 = beta eta_dec^2 / theta_i) and is what :func:`pvae.diagnostics.kl_per_dim` measures
at convergence. The factor 1/2 of the Gaussian log-likelihood is the convention here (the
paper writes the reconstruction term as ||.||^2 / eta_dec^2 with the same resulting formulas;
checked numerically against a fitted pair in tests/core/test_theory.py).

The 2-level hierarchical case (the paper's Theorems 3 and 5) is not implemented: its
thresholds were not verified against a numerically optimised model here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LinearCollapse", "linear_cvae_collapse", "residual_eigenvalues"]


@dataclass
class LinearCollapse:
    """What :func:`linear_cvae_collapse` predicts at the optimum, one entry per latent mode.

    ``theta``: the eigenvalues of the residual covariance of y given x, descending ``(d_y,)``;
    ``threshold``: beta * eta_dec^2; ``collapsed``: ``(d_z,)`` bool, mode i collapsed;
    ``singular_values``: of U1, descending ``(d_z,)``; ``encoder_std``: sigma_i ``(d_z,)``;
    ``kl``: the KL of each latent mode in nats ``(d_z,)``. Latent modes beyond d_y are
    collapsed (theta = 0).
    """

    theta: torch.Tensor
    threshold: float
    collapsed: torch.Tensor
    singular_values: torch.Tensor
    encoder_std: torch.Tensor
    kl: torch.Tensor

    @property
    def num_collapsed(self) -> int:
        return int(self.collapsed.sum())


def _moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must be (N, d_x) and (N, d_y) with the same N, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    n = x.shape[0]
    return x.T @ x / n, x.T @ y / n, y.T @ y / n


def residual_eigenvalues(Sxx: torch.Tensor, Sxy: torch.Tensor, Syy: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of E = Syy - Syx Sxx^-1 Sxy, descending, ``(d_y,)``."""
    Sxx, Sxy, Syy = Sxx.double(), Sxy.double(), Syy.double()
    if Sxx.shape[0] == 0:
        residual = Syy
    else:
        residual = Syy - Sxy.T @ torch.linalg.solve(Sxx, Sxy)
    residual = 0.5 * (residual + residual.T)
    return torch.linalg.eigvalsh(residual).flip(0).clamp(min=0.0)


def linear_cvae_collapse(
    Sxx: torch.Tensor | None = None,
    Sxy: torch.Tensor | None = None,
    Syy: torch.Tensor | None = None,
    z_dim: int = 1,
    beta: float = 1.0,
    eta_enc: float = 1.0,
    eta_dec: float = 1.0,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
) -> LinearCollapse:
    """Predicted collapse of the linear CVAE (module docstring) at its global optimum.

    Give the second moments ``Sxx (d_x, d_x)``, ``Sxy (d_x, d_y)``, ``Syy (d_y, d_y)``, or the
    data ``x (N, d_x)``, ``y (N, d_y)`` (uncentred second moments: the linear model has no
    biases, so centre the data or add a constant input), or the residual eigenvalues
    ``theta`` directly.

    :param z_dim: latent dimension d_z.
    :param beta: KL weight; ``eta_enc``: prior std; ``eta_dec``: decoder noise std.
    :returns: :class:`LinearCollapse`.
    """
    if z_dim < 1:
        raise ValueError(f"z_dim must be >= 1, got {z_dim}")
    if beta <= 0 or eta_enc <= 0 or eta_dec <= 0:
        raise ValueError(
            f"beta, eta_enc and eta_dec must be positive, got {beta}, {eta_enc}, {eta_dec}"
        )
    if theta is not None:
        values = torch.as_tensor(theta, dtype=torch.float64).flatten().sort(descending=True).values
    elif x is not None and y is not None:
        values = residual_eigenvalues(*_moments(x, y))
    elif Sxx is not None and Sxy is not None and Syy is not None:
        if Sxy.shape != (Sxx.shape[0], Syy.shape[0]):
            raise ValueError(
                f"Sxy must be (d_x, d_y) = ({Sxx.shape[0]}, {Syy.shape[0]}), got {tuple(Sxy.shape)}"
            )
        values = residual_eigenvalues(Sxx, Sxy, Syy)
    else:
        raise ValueError("give Sxx, Sxy and Syy, or the data x and y, or theta")
    threshold = float(beta) * float(eta_dec) ** 2
    modes = torch.zeros(z_dim, dtype=torch.float64)
    k = min(z_dim, values.numel())
    modes[:k] = values[:k]
    collapsed = modes <= threshold
    singular_values = (modes - threshold).clamp(min=0.0).sqrt() / eta_enc
    safe = torch.where(collapsed, torch.ones_like(modes), modes)
    active_std = (beta**0.5) * eta_enc * eta_dec / safe.sqrt()
    encoder_std = torch.where(collapsed, torch.full_like(modes, float(eta_enc)), active_std)
    kl = torch.where(collapsed, torch.zeros_like(modes), 0.5 * torch.log(safe / threshold))
    return LinearCollapse(values, threshold, collapsed, singular_values, encoder_std, kl)
