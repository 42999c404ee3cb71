"""The one importance-sampled log-likelihood estimator every evaluation uses.

    log p(x_n) ~= log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),   z_k ~ q(z | x_n)

It is the IWAE_K bound per datapoint: a lower bound in expectation that tightens as K grows
and equals log p(x_n) for every K when q is the exact posterior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from pvae import validation
from pvae.protocol import (
    Reducer,
    describe_scales,
    find_data_frame,
    get_traces,
    guess_max_plate_nesting,
    latent_sites,
    log_weights,
    scaled_latent_sites,
    trace_pair,
)

Data = Any  # a tensor, a tuple of tensors, or a torch Dataset


def as_tensors(data: Data) -> tuple[torch.Tensor, ...]:
    """The data as a tuple of tensors sharing their first dimension."""
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, tuple | list) and all(isinstance(t, torch.Tensor) for t in data):
        lengths = {t.shape[0] for t in data}
        if len(lengths) != 1:
            raise ValueError(f"tensors in the data tuple have different lengths: {lengths}")
        return tuple(data)
    if isinstance(data, torch.utils.data.Dataset):
        batch = get_batch(data, torch.arange(len(data)))  # type: ignore[arg-type]
        return batch
    raise TypeError(
        f"data must be a tensor, a tuple of tensors or a torch Dataset, got {type(data).__name__}"
    )


def num_items(data: Data) -> int:
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, tuple | list):
        return as_tensors(data)[0].shape[0]
    return len(data)  # type: ignore[arg-type]


def get_batch(data: Data, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``index`` of the data, as a tuple of tensors (the model's positional args)."""
    if isinstance(data, torch.Tensor):
        return (data[index],)
    if isinstance(data, tuple | list):
        return tuple(t[index] for t in data)
    if hasattr(data, "__getitems__"):
        batch = data.__getitems__(index.tolist())
    else:
        batch = torch.utils.data.default_collate([data[int(i)] for i in index])
    if isinstance(batch, tuple | list):
        return tuple(batch)
    return (batch,)


def iter_batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Consecutive batches of ``batch_size`` rows (the last may be smaller)."""
    n = num_items(data)
    for start in range(0, n, batch_size):
        yield get_batch(data, torch.arange(start, min(n, start + batch_size)))


class _FixGlobals(Messenger):
    """Gives the named sites their given values and leaves their densities out (observed,
    masked): the pair then describes ``p(x | w)`` and ``q(z | x, w)`` at the given ``w``."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True
            msg["mask"] = False


def _check_global_values(values: Any) -> dict[str, torch.Tensor]:
    if not isinstance(values, dict) or not values:
        raise TypeError(
            "global_values must be a non-empty dict {site name: tensor} of the pair's global "
            f"latent sites, got {type(values).__name__}"
        )
    checked = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"global_values: site names must be strings, got {name!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = torch.tensor(float(value), dtype=torch.get_default_dtype())
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"global_values[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"global_values[{name!r}] holds NaN or infinite values")
        checked[name] = value
    return checked


def log_likelihood(
    model: Callable,
    guide: Callable,
    data: Data,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int = 100,
    progress: bool = False,
    vectorize_particles: bool = True,
    global_values: dict[str, torch.Tensor] | None = None,
    data_plate: str = "data",
    **kwargs: Any,
) -> torch.Tensor:
    """Importance-sampled log p(x_n) for every datapoint, in nats (higher is better).

    :param model, guide: any pair whose per-datapoint latents sit in ``pyro.plate("data")``
        (or the plate named by ``data_plate``).
    :param data: a tensor ``(N, ...)``, a tuple of tensors (passed as positional arguments),
        or a torch Dataset.
    :param num_samples: importance samples K per datapoint.
    :param chunk_size: particles drawn per vectorised run; defaults to
        ``max(1, 10_000 // batch_size)``.
    :param batch_size: datapoints per run.
    :param vectorize_particles: draw ``chunk_size`` particles per run under a vectorised
        particle plate (default), or one particle per run, in a loop: for pairs that cannot be
        vectorised (boolean-mask indexing, ``torch.cat`` of particle-dependent and
        per-datapoint tensors). Both consume the random stream in the same order, so with the
        same draws they give the same values.
    :param global_values: ``{site name: tensor}`` for the pair's global latents (sites outside
        the data plate, e.g. weights ``w``): the model and the guide use these values and their
        densities are left out, so the result is ``log p(x_n | w)`` per datapoint.
    :param data_plate: the name of the plate holding the datapoint dimension (Pyro's DMM
        example: ``"z_minibatch"``).
    :param kwargs: keyword arguments of the model and the guide.
    :returns: tensor of shape ``(N,)``.

    Memory: at most ``chunk_size * batch_size`` samples are alive at once, so peak memory is
    about that many rows of the widest activation of the pair (for a 784-200-200-50 MLP VAE
    with the defaults, 10,000 rows x 784 floats x 4 bytes ~ 31 MB per tensor of the graph,
    about 0.2 GB in all); it does not grow with ``num_samples``.

    ``data`` gets ``fit``'s checks, with its messages (finite values, the data plate, the
    support of every observed site on the whole data set, dtype and shape against the pair),
    whether Pyro's validation is on or off. Refused: global latents without
    ``global_values`` (they cannot be marginalised per datapoint; conditioning the model on
    them with ``pyro.poutine.condition`` would add ``log p(w)`` to every datapoint), and latent
    sites with a scale of their own (``poutine.scale``: the weights would not be
    ``p(x, z) / q(z | x)``).
    """
    num_samples = validation.positive_int(num_samples, "num_samples")
    batch_size = validation.positive_int(batch_size, "batch_size")
    if chunk_size is not None:
        chunk_size = validation.positive_int(chunk_size, "chunk_size")
    plate = validation.plate_name(data_plate)
    data = validation.as_data(data, "data")
    model, guide = _checked_pair(model, guide, data, kwargs, global_values, batch_size, plate)
    chunk_size = chunk_size or max(1, 10_000 // batch_size)
    if not vectorize_particles:
        chunk_size = 1  # one particle per run: no particle plate
    n = num_items(data)
    results = []
    nesting: int | None = None
    bar = tqdm(total=n * num_samples, disable=not progress, desc="log p(x)", unit="sample")
    with torch.no_grad():
        for batch in iter_batches(data, batch_size):
            if nesting is None:
                nesting = guess_max_plate_nesting(model, guide, batch, kwargs)
            results.append(
                _batch_log_likelihood(
                    model, guide, batch, kwargs, num_samples, chunk_size, nesting, plate, bar
                )
            )
    bar.close()
    return torch.cat(results)


def _batch_log_likelihood(
    model: Callable,
    guide: Callable,
    batch: tuple,
    kwargs: dict,
    num_samples: int,
    chunk_size: int,
    nesting: int,
    plate: str,
    bar: Any,
) -> torch.Tensor:
    """:func:`log_likelihood` of one batch, ``(B,)``: the log-mean-exp of ``num_samples``
    importance weights per datapoint, drawn ``chunk_size`` at a time."""
    total: torch.Tensor | None = None
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        model_trace, guide_trace = get_traces(
            model, guide, batch, kwargs, k, nesting, data_plate=plate
        )
        reducer = Reducer(nesting, find_data_frame(guide_trace, model_trace, plate=plate))
        _check_evaluable(model_trace, guide_trace, reducer, batch, plate)
        weights = log_weights(model_trace, guide_trace, reducer)
        chunk = torch.logsumexp(weights.local + weights.global_[:, None], 0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
        done += k
        bar.update(k * batch[0].shape[0])
    assert total is not None
    return total - math.log(num_samples)


def _checked_pair(
    model: Callable,
    guide: Callable,
    data: Data,
    kwargs: dict,
    global_values: Any,
    batch_size: int,
    plate: str,
) -> tuple[Callable, Callable]:
    """:func:`log_likelihood`'s checks of the pair against ``data`` (fit's data checks, the
    global values' names, no latent of its own scale); returns the pair to evaluate (its
    global latents fixed at ``global_values``, when given)."""
    fixed = None if global_values is None else _check_global_values(global_values)
    pair = model if not kwargs else _with_kwargs(model, kwargs)
    pair_guide = guide if not kwargs else _with_kwargs(guide, kwargs)
    traces = validation.check_pair_data(
        pair, pair_guide, data, "data", batch_size, get_batch, "log_likelihood", plate
    )
    if fixed is not None:
        _check_global_names(pair, pair_guide, get_batch(data, torch.arange(1)), fixed, plate)
        model, guide = _FixGlobals(fixed)(model), _FixGlobals(fixed)(guide)
        pair, pair_guide = _FixGlobals(fixed)(pair), _FixGlobals(fixed)(pair_guide)
        traces = trace_pair(pair, pair_guide, get_batch(data, torch.arange(1)))
    refuse_scaled_latents(traces, "log_likelihood", plate)
    return model, guide


def _check_global_names(
    model: Callable, guide: Callable, batch: tuple, fixed: dict, plate: str
) -> None:
    """Every name in ``global_values`` is a latent site of the model outside the data plate."""
    model_trace, guide_trace = trace_pair(model, guide, batch)
    frame = find_data_frame(guide_trace, model_trace, plate=plate)
    for name in fixed:
        site = model_trace.nodes.get(name)
        if site is None or site["type"] != "sample" or site["is_observed"]:
            raise ValueError(
                f"global_values names {name!r}, which the model does not sample as a latent"
            )
        if frame is not None and any(f.name == frame.name for f in site["cond_indep_stack"]):
            raise ValueError(
                f"global_values names {name!r}, a per-datapoint site inside the {plate!r} plate; "
                "global_values is for global latents (outside the plate) only"
            )


def _with_kwargs(fn: Callable, kwargs: dict) -> Callable:
    def call(*args: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def refuse_scaled_latents(traces: tuple[Any, Any], who: str, plate: str = "data") -> None:
    """Raise when the pair's latent sites carry their own scale (see
    :func:`pvae.protocol.scaled_latent_sites`); ``traces``: ``(model_trace, guide_trace)`` of
    one run of the pair (the data checks' probe); ``plate``: the data plate's name."""
    found = scaled_latent_sites(*traces, plate=plate)
    if found:
        raise ValueError(
            f"{who}: latent sites {describe_scales(found)} carry a scale of their own "
            "(pyro.poutine.scale: KL annealing, a per-layer beta or KL weight), so the value "
            "would be a weighted objective, not a bound on log p(x); evaluate the pair with "
            "that scale set to 1"
        )


def _check_evaluable(model_trace, guide_trace, reducer: Reducer, batch, plate: str) -> None:
    frame = reducer.data_frame
    if frame is None:
        raise ValueError(
            f"log_likelihood needs the per-datapoint sites inside pyro.plate({plate!r}, ...); "
            f"no plate named {plate!r} was found in the model or the guide"
        )
    if frame.full_size not in (None, frame.size) or frame.size != batch[0].shape[0]:
        raise ValueError(
            f"the {plate!r} plate has {frame.size} of {frame.full_size} datapoints but the "
            f"batch has {batch[0].shape[0]}; log_likelihood needs the plate to cover exactly "
            "the batch it is given (no subsample_size)"
        )
    for name, guide_site, _ in latent_sites(model_trace, guide_trace):
        if not reducer.is_local(guide_site):
            raise ValueError(
                f"latent site '{name}' is outside the {plate!r} plate (a global latent); "
                "log_likelihood marginalises per-datapoint latents only: pass the global "
                f"ones' values, log_likelihood(..., global_values={{{name!r}: value}}), for "
                "log p(x_n | value) per datapoint (conditioning the model with "
                "pyro.poutine.condition would add log p(value) to every datapoint)"
            )
