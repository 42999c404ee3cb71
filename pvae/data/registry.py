"""The dataset registry: :func:`register` a loader under a name, list them with
:func:`available` (what ``pvae datasets`` prints), :func:`load` one by name."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pvae import validation
from pvae.data.containers import DatasetInfo, DynamicBinarized, SequenceSplit, Splits

Loader = Callable[..., Splits]

_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(name: str, description: str, source: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(**kwargs) -> Splits`` under ``name``.

    :param name: the name :func:`load` looks up (case-insensitive; ``_`` and ``-`` match).
    :param description: one line for ``pvae datasets``.
    :param source: where the data come from (package, files, generator).
    :raises ValueError: if ``name`` is already registered.
    """
    key = _normalise_name(name)

    def decorator(loader: Loader) -> Loader:
        if key in _REGISTRY:
            raise ValueError(f"dataset {key!r} is already registered")
        _REGISTRY[key] = (DatasetInfo(key, description, source), loader)
        return loader

    return decorator


def register_options(
    name: str, description: str, source: str, options: type
) -> Callable[[Callable[[Any], Splits]], Loader]:
    """Decorator registering ``build(options) -> Splits`` under ``name`` (as :func:`register`)
    for a loader whose keywords are many: ``options`` is a dataclass whose fields (names,
    annotations, defaults, order) are the loader's keywords and whose ``__post_init__``
    checks them. The registered loader, returned, is ``loader(*args, **kwargs) =
    build(options(*args, **kwargs))`` with the signature of ``options``, which :func:`load`
    reads."""

    def decorator(build: Callable[[Any], Splits]) -> Loader:
        def loader(*args: Any, **kwargs: Any) -> Splits:
            return build(options(*args, **kwargs))

        loader.__name__ = loader.__qualname__ = build.__name__
        loader.__module__, loader.__doc__ = build.__module__, build.__doc__
        returns = inspect.signature(build).return_annotation
        signature = inspect.signature(options).replace(return_annotation=returns)
        loader.__signature__ = signature  # type: ignore[attr-defined]
        return register(name, description, source)(loader)

    return decorator


def available() -> list[DatasetInfo]:
    """All registered datasets, sorted by name."""
    return [info for info, _ in sorted(_REGISTRY.values(), key=lambda entry: entry[0].name)]


def load(name: str, **kwargs: Any) -> Splits:
    """Load the dataset registered as ``name``, split into train/valid/test.

    :param name: a name from :func:`available` (e.g. ``"digits"``, ``"mnist5k"``, ``"mnist"``,
        ``"fashion-mnist"``, ``"linear-gaussian"``, ``"pendulum"``, ``"rotating-digits"``).
    :param kwargs: passed to the loader, e.g. ``seed=0``, ``binarize="dynamic"``, ``path=``.
    :returns: :class:`Splits` (or a subclass: :class:`MultimodalSplits`, :class:`SequenceSplits`),
        every split checked to be finite (a sequence split at its observed steps).
    :raises ValueError: unknown name, a seed outside ``[0, 2**32 - 1]``, a number that is
        not finite, or NaN/inf in a split (the loader checks its own ranges).
    :raises TypeError: a keyword the loader does not accept, or a value of another type than
        the loader's annotation says (``seed`` an int; an ``int`` option a whole number, not a
        bool; a ``float`` option a real number, not a bool; a ``bool`` option True or False;
        a ``str`` option a string).
    """
    key = _normalise_name(name)
    if key not in _REGISTRY:
        names = ", ".join(info.name for info in available())
        raise ValueError(f"unknown dataset {name!r}; available: {names}")
    _, loader = _REGISTRY[key]
    parameters = inspect.signature(loader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            accepted = ", ".join(parameters) or "none"
            raise TypeError(
                f"load({key!r}) got unexpected keyword argument(s) "
                f"{', '.join(repr(u) for u in unknown)}; accepted: {accepted}"
            )
    _check_arguments(key, parameters, kwargs)
    splits = loader(**kwargs)
    for split in ("train", "valid", "test"):
        _check_finite(key, split, getattr(splits, split))
    return splits


def _check_arguments(key: str, parameters: Mapping[str, inspect.Parameter], kwargs: dict) -> None:
    """Every keyword against the loader's annotation, before the loader runs: the checks that
    every loader would otherwise repeat (or forget). ``seed`` must suit every generator."""
    for name, value in kwargs.items():
        where = f"load({key!r}): {name}"
        if name == "seed":
            validation.seed_value(value, where)
            continue
        parameter = parameters.get(name)
        annotation = parameter.annotation if parameter is not None else None
        if isinstance(annotation, type):
            annotation = annotation.__name__
        if not isinstance(annotation, str):
            continue
        kinds = {part.strip() for part in annotation.split("|")}
        if value is None and "None" in kinds:
            continue
        kinds.discard("None")
        if kinds == {"int"}:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{where} must be an integer, got {value!r}")
        elif kinds == {"float"}:
            validation.finite_float(value, where)
        elif kinds == {"bool"}:
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"{where} must be True or False, got {value!r}")
        elif kinds == {"str"} and not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")


def _check_finite(
    name: str, split: str, values: Tensor | DynamicBinarized | tuple[Tensor, ...]
) -> None:
    if isinstance(values, SequenceSplit):  # only observed steps are data
        _check_finite(name, split, values.values[values.mask])
        _check_finite(name, split, values.times)
        return
    if isinstance(values, tuple):  # a multimodal split: one tensor per modality
        for tensor in values:
            _check_finite(name, split, tensor)
        return
    tensor = values.probs if isinstance(values, DynamicBinarized) else values
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"dataset {name!r}: the {split} split holds {bad} NaN/inf value(s); "
            "check the source files"
        )
