"""How well inferred latents identify the true ones: R^2 of affine regressions (Gondur et al.
2024).

For an inferred group g (values ``(N, T, L_g)``, or ``(N, L_g)``) and a true group h
(``(N, T, L_h)``), every (trial, step) is one row: the true values are regressed on the inferred
ones with an intercept, ``y ~ W x + b``, by least squares, and

    R^2(g -> h) = 1 - sum ||y - W x - b||^2 / sum ||y - mean(y)||^2

(the share of the true group's total variance that an affine map of the inferred group
explains; the outputs of a multi-dimensional true group are pooled). Affine maps leave R^2
unchanged, so the sign, scale and offset of a latent do not matter, nor does a rotation within
a group.

Held-out scoring (``holdout=True``, the default): the map is fitted on the first half of the
trials and scored on the second half, so a group that carries no information scores about 0
(or below) however many dimensions it has, instead of the in-sample ``L_g / (rows - 1)`` bias;
``holdout=False`` fits and scores on all trials (in-sample R^2, in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Identification", "identification_r2"]


@dataclass
class Identification:
    """The R^2 of affine regressions from inferred to true latent groups.

    :ivar inferred: the inferred groups' names (rows of :attr:`r2`).
    :ivar true: the true groups' names (columns of :attr:`r2`).
    :ivar r2: ``(len(inferred), len(true))`` tensor; ``r2[i, j]`` = R^2 of true group j from
        inferred group i.
    :ivar diagonal: ``{name: R^2}`` for the names in both (the matched groups).
    :ivar holdout: whether the scores are on held-out trials.
    """

    inferred: tuple[str, ...]
    true: tuple[str, ...]
    r2: Tensor
    diagonal: dict[str, float]
    holdout: bool

    def __getitem__(self, key: tuple[str, str]) -> float:
        """``result["shared", "neural"]``: R^2 of the true group ``"neural"`` from the inferred
        group ``"shared"``."""
        inferred, true = key
        return float(self.r2[self.inferred.index(inferred), self.true.index(true)])

    def off_diagonal_max(self) -> float:
        """The largest R^2 between differently named groups (-inf when there is none)."""
        scores = [
            float(self.r2[i, j])
            for i, a in enumerate(self.inferred)
            for j, b in enumerate(self.true)
            if a != b
        ]
        return max(scores, default=float("-inf"))

    def table(self) -> str:
        """The matrix as text: rows inferred groups, columns true groups."""
        width = max(len(n) for n in (*self.inferred, *self.true, "inferred \\ true"))
        lines = ["inferred \\ true".ljust(width) + "".join(f"  {n:>{width}}" for n in self.true)]
        for i, name in enumerate(self.inferred):
            cells = "".join(f"  {float(v):>{width}.3f}" for v in self.r2[i])
            lines.append(name.ljust(width) + cells)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _rows(name: str, value: object, leading: tuple[int, ...] | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (N, T, L) or (N, L), got {tuple(value.shape)}")
    if leading is not None and tuple(value.shape[:-1]) != leading:
        raise ValueError(
            f"{name} has leading shape {tuple(value.shape[:-1])}, the other groups {leading}; "
            "every group must share (N, T)"
        )
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN/inf")
    return value.detach().double()


def _as_groups(name: str, groups: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:
    if isinstance(groups, Tensor):
        return {"latent": groups}
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"{name} must be a tensor or a non-empty dict of tensors")
    return dict(groups)


def _r2(x_fit: Tensor, y_fit: Tensor, x_score: Tensor, y_score: Tensor) -> float:
    ones_fit = torch.ones(x_fit.shape[0], 1, dtype=x_fit.dtype)
    design = torch.cat([x_fit, ones_fit], -1)
    solution = torch.linalg.lstsq(design, y_fit, driver="gelsd").solution
    ones_score = torch.ones(x_score.shape[0], 1, dtype=x_score.dtype)
    residual = y_score - torch.cat([x_score, ones_score], -1) @ solution
    total = (y_score - y_score.mean(0)).pow(2).sum()
    if float(total) == 0.0:
        return float("nan")
    return float(1 - residual.pow(2).sum() / total)


def identification_r2(
    inferred: Mapping[str, Tensor] | Tensor,
    true: Mapping[str, Tensor] | Tensor,
    holdout: bool = True,
) -> Identification:
    """R^2 of affine least-squares regressions from each inferred group to each true group.

    :param inferred: ``{group: (N, T, L_g) or (N, L_g)}`` inferred latents (e.g. posterior
        means), or one tensor (group ``"latent"``).
    :param true: ``{group: (N, T, L_h) or (N, L_h)}`` true latents, the same leading shape.
    :param holdout: fit on the first half of the N trials, score on the second (default);
        False: in-sample.
    :returns: :class:`Identification` with the matrix and the diagonal of matching names.
    :raises TypeError, ValueError: non-tensors, wrong ranks, mismatched ``(N, T)``, NaN/inf,
        fewer than 2 trials for held-out scoring.
    """
    inferred_groups = _as_groups("inferred", inferred)
    true_groups = _as_groups("true", true)
    leading: tuple[int, ...] | None = None
    checked: dict[str, dict[str, Tensor]] = {"inferred": {}, "true": {}}
    for kind, groups in (("inferred", inferred_groups), ("true", true_groups)):
        for key, value in groups.items():
            tensor = _rows(f"{kind}[{key!r}]", value, leading)
            leading = tuple(tensor.shape[:-1])
            checked[kind][key] = tensor
    assert leading is not None
    n = leading[0]
    if holdout and n < 2:
        raise ValueError(f"held-out scoring needs at least 2 trials, got {n}; use holdout=False")
    half = n // 2 if holdout else n
    r2 = torch.empty(len(inferred_groups), len(true_groups), dtype=torch.float64)
    for i, x in enumerate(checked["inferred"].values()):
        for j, y in enumerate(checked["true"].values()):
            x_fit, y_fit = x[:half].reshape(-1, x.shape[-1]), y[:half].reshape(-1, y.shape[-1])
            if holdout:
                x_score, y_score = (
                    x[half:].reshape(-1, x.shape[-1]),
                    y[half:].reshape(-1, y.shape[-1]),
                )
            else:
                x_score, y_score = x_fit, y_fit
            r2[i, j] = _r2(x_fit, y_fit, x_score, y_score)
    names_inferred, names_true = tuple(inferred_groups), tuple(true_groups)
    diagonal = {
        name: float(r2[i, names_true.index(name)])
        for i, name in enumerate(names_inferred)
        if name in names_true
    }
    return Identification(names_inferred, names_true, r2, diagonal, bool(holdout))
