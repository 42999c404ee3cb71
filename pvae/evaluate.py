"""The one importance-sampled log-likelihood estimator every evaluation uses.

    log p(x_n) ~= log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),   z_k ~ q(z | x_n)

It is the IWAE_K bound per datapoint: a lower bound in expectation that tightens as K grows
and equals log p(x_n) for every K when q is the exact posterior.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from tqdm.auto import tqdm

from pvae import validation
from pvae.protocol import (
    PARTICLE_PLATE,
    LogWeights,
    Reducer,
    _run_traced,
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

ROWS = 2000
"""Particles x datapoints per vectorised run by default (``chunk_size = ROWS // batch_size``).
On a CPU runs of a few thousand rows keep the decoder's output and the likelihood's
temporaries in cache (MNIST, a 784-200-200-50 MLP VAE, one thread: 12-13 us per sample
against 16-19 us in runs of 5,000 or 10,000 rows; runs of 500 rows pay Pyro's fixed cost per
run, 18 us). With 100 points per run the particles are drawn 20 at a time: the same draws as
100 at a time (torch fills a tensor of normal draws in blocks of 16 values)."""

AGREEMENT = 1e-6
"""Relative tolerance of the check of the guide-once path against the traced run."""


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
    reuse_guide: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """Importance-sampled log p(x_n) for every datapoint, in nats (higher is better).

    :param model, guide: any pair whose per-datapoint latents sit in ``pyro.plate("data")``
        (or the plate named by ``data_plate``).
    :param data: a tensor ``(N, ...)``, a tuple of tensors (passed as positional arguments),
        or a torch Dataset.
    :param num_samples: importance samples K per datapoint.
    :param chunk_size: particles drawn per vectorised run; defaults to
        ``max(1, ROWS // batch_size)`` (:data:`ROWS` = 1000 rows per run).
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
    :param reuse_guide: run the guide once per batch and draw each run's particles from its
        distributions (the same draws), replaying only the model; checked against the traced
        run on the first run, tracing every run where they differ (a dependent guide).
    :param kwargs: keyword arguments of the model and the guide.
    :returns: tensor of shape ``(N,)``.

    Memory: at most ``chunk_size * batch_size`` samples are alive at once, so peak memory is
    about that many rows of the widest activation of the pair (for a 784-200-200-50 MLP VAE
    with the defaults, 2,000 rows x 784 floats x 4 bytes ~ 6 MB per tensor of the graph);
    it does not grow with ``num_samples``.

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
    if not isinstance(reuse_guide, bool):
        raise TypeError(f"reuse_guide must be True or False, got {reuse_guide!r}")
    plate = validation.plate_name(data_plate)
    data = validation.as_data(data, "data")
    model, guide = _checked_pair(model, guide, data, kwargs, global_values, batch_size, plate)
    chunk_size = chunk_size or max(1, ROWS // batch_size)
    if not vectorize_particles:
        chunk_size = 1  # one particle per run: no particle plate
    n = num_items(data)
    results = []
    nesting: int | None = None
    runs = _Runs(model, guide, kwargs, plate, reuse_guide)
    bar = tqdm(total=n * num_samples, disable=not progress, desc="log p(x)", unit="sample")
    with torch.no_grad():
        for batch in iter_batches(data, batch_size):
            if nesting is None:
                nesting = guess_max_plate_nesting(model, guide, batch, kwargs)
            runs.start(batch, nesting)
            results.append(_batch_log_likelihood(runs, batch, num_samples, chunk_size, bar))
    bar.close()
    return torch.cat(results)


def _batch_log_likelihood(
    runs: _Runs, batch: tuple, num_samples: int, chunk_size: int, bar: Any
) -> torch.Tensor:
    """:func:`log_likelihood` of one batch, ``(B,)``: the log-mean-exp of ``num_samples``
    importance weights per datapoint, drawn ``chunk_size`` at a time."""
    total: torch.Tensor | None = None
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        weights = runs.weights(k)
        chunk = torch.logsumexp(weights.local + weights.global_[:, None], 0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
        done += k
        bar.update(k * batch[0].shape[0])
    assert total is not None
    return total - math.log(num_samples)


class _Runs:
    """The vectorised runs of :func:`log_likelihood` on one batch at a time: log weights of
    ``k`` particles per call of :meth:`weights`, ``(k, B)`` local and ``(k,)`` global.

    With ``reuse_guide`` the guide runs once per batch (:meth:`start`, in a forked random
    state: it draws nothing from the stream) and each run draws its particles from the
    distributions of that guide trace, expanded as the particle plate would expand them (so
    the draws are the traced run's), and replays the model on them: the encoder is not
    recomputed per run. The first run of the call is computed both ways from the same random
    state (:meth:`_checked`); if the weights differ by more than a relative :data:`AGREEMENT`
    or the random numbers consumed differ (a guide whose later latents depend on earlier
    draws, or that draws random numbers outside its sample sites), every run of the call is
    traced as before.
    """

    def __init__(
        self, model: Callable, guide: Callable, kwargs: dict, plate: str, reuse_guide: bool
    ) -> None:
        self.model, self.guide, self.kwargs, self.plate = model, guide, kwargs, plate
        self.reuse: bool | None = None if reuse_guide else False  # None: not yet checked
        self.batch: tuple = ()
        self.nesting = 0
        self.guide_trace: Trace | None = None

    def start(self, batch: tuple, nesting: int) -> None:
        """A new batch: its guide trace, once, without particles (when reusing the guide)."""
        self.batch, self.nesting, self.guide_trace = batch, nesting, None
        if self.reuse is not False:
            with _fork_rng(batch):
                tracer = poutine.trace(self.guide)
                self.guide_trace = _run_traced(tracer, batch, self.kwargs)

    def weights(self, k: int) -> LogWeights:
        if self.reuse is None:
            return self._checked(k)
        if self.reuse:
            return self._log_weights(*self._reused(k))
        return self._log_weights(*self._traced(k))

    def _traced(self, k: int) -> tuple[Trace, Trace]:
        return get_traces(self.model, self.guide, self.batch, self.kwargs, k, self.nesting,
                          data_plate=self.plate)  # fmt: skip

    def _reused(self, k: int) -> tuple[Trace, Trace]:
        """The model replayed on ``k`` particles drawn from the batch's guide trace."""
        assert self.guide_trace is not None
        guide_trace = _draw(self.guide_trace, k, self.nesting)
        model = self.model
        if k > 1:
            model = pyro.plate(PARTICLE_PLATE, k, dim=-(self.nesting + 1))(model)
        tracer = poutine.trace(poutine.replay(model, trace=guide_trace))
        return _run_traced(tracer, self.batch, self.kwargs), guide_trace

    def _log_weights(self, model_trace: Trace, guide_trace: Trace) -> LogWeights:
        reducer = Reducer(self.nesting, find_data_frame(guide_trace, model_trace, plate=self.plate))
        _check_evaluable(model_trace, guide_trace, reducer, self.batch, self.plate)
        return log_weights(model_trace, guide_trace, reducer)

    def _checked(self, k: int) -> LogWeights:
        """The first run both ways from one random state; decides :attr:`reuse`."""
        before = _rng_state(self.batch)
        traced = self._log_weights(*self._traced(k))
        after = _rng_state(self.batch)
        _set_rng_state(self.batch, before)
        try:
            reused: LogWeights | None = self._log_weights(*self._reused(k))
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            reused = None
        self.reuse = (
            reused is not None
            and _same_state(_rng_state(self.batch), after)
            and _agree(reused, traced)
        )
        if not self.reuse:
            _set_rng_state(self.batch, after)
            return traced
        assert reused is not None
        return reused


def _draw(guide_trace: Trace, k: int, nesting: int) -> Trace:
    """A copy of ``guide_trace`` whose latent sites hold ``k`` fresh particles (no particle
    dimension when ``k == 1``): each site's distribution expanded to the batch shape the
    particle plate at ``dim=-(nesting + 1)`` gives it, then sampled as Pyro samples it."""
    trace = Trace()
    for name, site in guide_trace.nodes.items():
        node = dict(site)
        if site["type"] == "sample" and not site["is_observed"]:
            fn: Any = site["fn"]
            if k > 1:
                batch_shape = fn.batch_shape
                padding = (1,) * max(0, nesting - len(batch_shape))
                fn = fn.expand(torch.Size((k, *padding, *batch_shape)))
            node["fn"] = fn
            node["value"] = fn(*site["args"], **site["kwargs"])
        trace.add_node(name, **node)
    return trace


def _agree(a: LogWeights, b: LogWeights) -> bool:
    """The same log weights, within a relative :data:`AGREEMENT` (NaN matching NaN)."""
    if a.local.shape != b.local.shape or a.global_.shape != b.global_.shape:
        return False
    if a.data_scale != b.data_scale or a.global_latents != b.global_latents:
        return False
    return all(
        bool(torch.isclose(x, y, rtol=AGREEMENT, atol=AGREEMENT, equal_nan=True).all())
        for x, y in ((a.local, b.local), (a.global_, b.global_))
    )


def _fork_rng(batch: tuple) -> contextlib.AbstractContextManager[Any]:
    """Fork the generator the batch's device samples from (and the CPU's)."""
    device = batch[0].device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(device_type=device.type)


def _rng_state(batch: tuple) -> tuple[torch.Tensor, ...]:
    """The CPU generator's state, and the CUDA device's for a batch on a GPU."""
    device = batch[0].device
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return (torch.get_rng_state(),)


def _set_rng_state(batch: tuple, state: tuple[torch.Tensor, ...]) -> None:
    torch.set_rng_state(state[0])
    if len(state) > 1:
        torch.cuda.set_rng_state(state[1], batch[0].device)


def _same_state(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


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
