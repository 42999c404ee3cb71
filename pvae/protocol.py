"""The model/guide protocol: tracing a pair with vectorised particles and reducing its log
densities to per-datapoint terms.

Every engine and the log-likelihood estimator go through this module, so that the rules of the
protocol (README, "Your own model, any engine") live in one place:

- per-datapoint latents sit inside ``pyro.plate("data", ...)`` (another name where the caller
  passes it as ``plate``/``data_plate``); its dimension is read from the traces, never assumed;
- particles are vectorised with an outermost ``pyro.plate`` of size ``num_particles`` at
  ``dim = -(max_plate_nesting + 1)``; a model that cannot be vectorised fails with an error
  naming the last site that was reached;
- a site inside the data plate contributes a ``(num_particles, batch)`` tensor of
  *unscaled* per-datapoint log densities; the plate's N/B factor is kept aside
  (``data_scale``) so that engines can take a log-sum-exp over particles per datapoint before
  scaling. Every other site contributes a ``(num_particles,)`` tensor, counted once.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

Site = Any  # a Pyro trace node (pyro.poutine.runtime.Message)

DATA_PLATE = "data"
PARTICLE_PLATE = "num_particles_vectorized"


class VectorizationError(ValueError):
    """A model or guide failed when run with vectorised particles."""


# --------------------------------------------------------------------------------------------
# Minibatch scaling for pairs whose data plate is sized by the batch.


class _ScaleDataPlate(Messenger):
    """Counts every site in the data plate (named ``plate``) ``num_data / batch`` times.

    A user's plate written as ``pyro.plate("data", x.shape[0])`` sees only the batch; this
    messenger records the full size on the plate's frame and multiplies the site's scale, so
    that per-datapoint terms count N/B times and global terms once. Plates that already
    subsample (``pyro.plate("data", N, subsample_size=B)``) are left as they are.

    A plate without a size (``pyro.plate("data")``, as in Pyro's CVAE and SS-VAE examples)
    has ``size == full_size == -1`` on its frame; the batch size B is then read from the
    site itself (its batch shape, or its observed value, at the plate's dim) and written on
    the frame. A site that has no such dimension (a ``pyro.deterministic`` of the whole batch)
    is left as it is.
    """

    def __init__(self, num_data: int, plate: str = DATA_PLATE):
        super().__init__()
        self.num_data = int(num_data)
        self.plate = plate

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        stack = msg["cond_indep_stack"]
        for i, frame in enumerate(stack):
            if frame.name == self.plate and frame.full_size in (None, frame.size):
                size = frame.size
                if size is None or size < 0:
                    size = site_batch_size(msg, frame)
                    if size is None:
                        return
                msg["cond_indep_stack"] = (
                    stack[:i]
                    + (frame._replace(size=size, full_size=self.num_data),)
                    + stack[i + 1 :]
                )
                msg["scale"] = msg["scale"] * (self.num_data / size)
                return


def site_batch_size(site: Site, frame: CondIndepStackFrame) -> int | None:
    """The size of ``site`` along ``frame``'s dim: from its distribution's batch shape or, where
    that broadcasts (size 1), from its value's; None when neither has that dimension."""
    if frame.dim is None:
        return None
    sizes = []
    fn = site["fn"]
    batch_shape = getattr(fn, "batch_shape", None)
    if batch_shape is not None and len(batch_shape) >= -frame.dim:
        sizes.append(int(batch_shape[frame.dim]))
    value = site["value"]
    if isinstance(value, torch.Tensor) and batch_shape is not None:
        event_dim = len(getattr(fn, "event_shape", ()))
        value_batch = value.shape[: value.dim() - event_dim]
        if len(value_batch) >= -frame.dim:
            sizes.append(int(value_batch[frame.dim]))
    return max(sizes) if sizes else None


def scale_to_data(fn: Callable, num_data: int, plate: str = DATA_PLATE) -> Callable:
    """Wrap a model or guide so its data plate (the plate named ``plate``) stands for
    ``num_data`` datapoints.

    ``pvae.fit`` does this for you; use it with ``pyro.infer.SVI`` when you feed minibatches
    to a pair whose data plate is sized by the batch.
    """
    return _ScaleDataPlate(num_data, plate)(fn)


# --------------------------------------------------------------------------------------------
# Tracing.


def _run_traced(tracer: Any, args: tuple, kwargs: dict, prune: bool = True) -> Trace:
    """Run a ``poutine.trace`` handler and return its own trace, subsample sites removed in
    place (``prune``): what ``prune_subsample_sites(tracer.get_trace(...))`` returns, without
    its two copies of the trace."""
    tracer(*args, **kwargs)
    trace = tracer.msngr.trace
    if prune:
        _prune(trace)
    return trace


def _prune(trace: Trace) -> None:
    """Remove ``trace``'s subsample sites (a plate's indices) in place."""
    for name in [name for name, site in trace.nodes.items() if site_is_subsample(site)]:
        trace.remove_node(name)


def _last_sample(*tracers: Any) -> str | None:
    """The name of the last sample site recorded by the first of ``tracers`` that recorded
    one (for error messages: the traces of a failed run are left in their handlers)."""
    for tracer in tracers:
        if tracer is None:
            continue
        for name, site in reversed(tracer.msngr.trace.nodes.items()):
            if site["type"] == "sample":
                return name
    return None


def trace_pair(
    model: Callable, guide: Callable, args: tuple, kwargs: dict | None = None
) -> tuple[Trace, Trace]:
    """Run the guide once and the model replayed on it: blocked, without gradients and without
    particles, leaving torch's random state as it found it (so that looking at a pair before
    training does not shift the random stream; exact resume depends on this).

    :returns: ``(model_trace, guide_trace)``.
    """
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return model_trace, guide_trace


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The deepest plate nesting of the pair, from one run of :func:`trace_pair`."""
    return plate_nesting(*trace_pair(model, guide, args, kwargs))


def plate_nesting(*traces: Trace) -> int:
    """The deepest plate nesting of the traces' sample sites."""
    dims: list[int] = [
        -int(frame.dim or 0)
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def check_guide_covers_model(model_trace: Any, guide_trace: Any, who: str) -> None:
    """Every latent the model samples must be sampled by the guide (else it is drawn from the
    prior, silently)."""
    missing = [
        site_name
        for site_name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)  # a plate's index site, not a latent
        and site_name not in guide_trace.nodes
        and not (site.get("infer") or {}).get("enumerate")
        and not (site.get("infer") or {}).get("is_auxiliary")
    ]
    if missing:
        raise ValueError(
            f"{who}: the model samples latent sites {missing} that the guide does not sample; "
            "every latent of the model needs a site of the same name in the guide"
        )


def get_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
    vectorize: bool = True,
    data_plate: str = DATA_PLATE,
) -> tuple[Trace, Trace]:
    """Trace the guide with ``num_particles`` vectorised particles and replay the model on it.

    With ``num_particles == 1`` or ``vectorize=False`` no particle plate is added (the caller
    loops over particles and concatenates with :meth:`LogWeights.cat`). Pyro errors raised
    under the particle plate are re-raised as :class:`VectorizationError` naming the last
    site reached (or, for a pair that runs without particles but has no plate named
    ``data_plate``, as the plate rule's error).
    """
    wrap: Callable[[Callable], Callable]
    if num_particles > 1 and vectorize:
        plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
        wrap = plate
    else:

        def wrap(fn: Callable) -> Callable:
            return fn

    where = "guide"
    guide_tracer = poutine.trace(wrap(guide))
    model_tracer = None
    try:
        # The model is replayed on the guide's subsample sites too (a plate that subsamples
        # itself draws the guide's indices), which are pruned afterwards, as Pyro's ELBOs do.
        guide_trace = _run_traced(guide_tracer, args, kwargs, prune=False)
        where = "model"
        model_tracer = poutine.trace(poutine.replay(wrap(model), trace=guide_trace))
        model_trace = _run_traced(model_tracer, args, kwargs)
        _prune(guide_trace)
    except (RuntimeError, ValueError, IndexError) as error:
        if num_particles == 1 or not vectorize:
            raise
        _check_single_particle(model, guide, args, kwargs, error, data_plate)
        last = _last_sample(model_tracer, guide_tracer)
        after = f"after site '{last}'" if last else "before its first sample site"
        raise VectorizationError(
            f"the {where} could not be run with {num_particles} vectorised particles: it failed "
            f"{after}. Particles add a leading dimension at dim={-(max_plate_nesting + 1)}; "
            "write shapes with negative indices (x.shape[-1], reshape(*x.shape[:-1], ...)) "
            "or pass vectorize_particles=False (the engines and pvae.log_likelihood take it). "
            "Original error: "
            f"{type(error).__name__}: {error}"
        ) from error
    return model_trace, guide_trace


def _check_single_particle(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    error: Exception,
    data_plate: str = DATA_PLATE,
) -> None:
    """After a failed vectorised run (an error path only): report the actual cause when it is
    not the particles. Pyro's validation of NaN or out-of-support values is re-raised as it is;
    a pair that fails without particles too raises that error; a pair that runs without
    particles but has no data plate is told the plate rule."""
    if "invalid values" in str(error) or "within the support" in str(error):
        raise error
    model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
    check_data_plate(model_trace, guide_trace, batch_rows(args), "the engine", plate=data_plate)


# --------------------------------------------------------------------------------------------
# Reducing site log densities to per-datapoint and global terms.


def find_data_frame(*traces: Trace, plate: str = DATA_PLATE) -> CondIndepStackFrame | None:
    """The frame of the data plate (the plate named ``plate``) in the traces, or None when
    there is none.

    A plate without a size (``pyro.plate("data")``) leaves ``size == -1`` on its frames; the
    size is then read from the sites in it (:func:`site_batch_size`), and a full size that is
    unknown too becomes that batch size (the plate does not subsample).
    """
    unsized: CondIndepStackFrame | None = None
    batch = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.name != plate or not frame.vectorized:
                    continue
                if frame.size is not None and frame.size >= 0:
                    return frame
                unsized = unsized or frame
                batch = max(batch, site_batch_size(site, frame) or 0)
    if unsized is None or batch == 0:
        return unsized
    full_size = unsized.full_size
    if full_size is None or full_size < 0:
        full_size = batch
    return unsized._replace(size=batch, full_size=full_size)


def check_data_plate(
    model_trace: Any, guide_trace: Any, batch_size: int, who: str, plate: str = DATA_PLATE
) -> None:
    """The pair's per-datapoint sites must sit in the data plate (``pyro.plate("data")``, or
    the plate named ``plate``): refuse a batch of more than one row whose traces have no such
    plate, naming the plates found (and one of another name that covers the batch, if any)."""
    if find_data_frame(guide_trace, model_trace, plate=plate) is not None or batch_size <= 1:
        return
    frames = [
        frame
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    ]
    names = sorted({frame.name for frame in frames})
    over_batch = sorted({f.name for f in frames if f.size == batch_size and f.name != plate})
    if over_batch:
        found = (
            f"it has plate {over_batch[0]!r} over the batch (its plates: {names}); pass "
            f"data_plate={over_batch[0]!r} or rename it to {plate!r}"
        )
    else:
        found = f"it has none (its plates: {names})" if names else "it has none (and no plates)"
    raise ValueError(
        f"{who}: the model and guide must put their per-datapoint sites inside "
        f"pyro.plate({plate!r}, ...) (the rule every engine reads the datapoints by: without "
        f"it minibatch scaling and per-datapoint bounds are wrong); {found}"
    )


def batch_rows(args: tuple) -> int:
    """The rows of the first tensor argument (0 when there is none)."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0:
            return int(arg.shape[0])
    return 0


@dataclass
class Reducer:
    """Sums a site's log-density tensor down to ``(K', B', D)``.

    ``K'`` is ``num_particles`` or 1 (a site that does not depend on the particles), ``B'`` the
    data-plate size for sites inside the data plate and 1 otherwise, ``D`` the flattened event
    elements kept (1 unless ``event_dims`` > 0). Mask and scale are applied, except the data
    plate's own N/B factor, which is returned separately as ``data_scale``.
    """

    max_plate_nesting: int
    data_frame: CondIndepStackFrame | None

    @property
    def data_scale(self) -> float:
        frame = self.data_frame
        if frame is None or frame.full_size is None:
            return 1.0
        return float(frame.full_size) / float(frame.size)

    @property
    def batch_size(self) -> int:
        return 1 if self.data_frame is None else int(self.data_frame.size)

    def is_local(self, site: Site) -> bool:
        frame = self.data_frame
        return frame is not None and any(
            f.name == frame.name and f.dim == frame.dim for f in site["cond_indep_stack"]
        )

    def __call__(self, value: torch.Tensor, site: Site, event_dims: int = 0):
        """Reduce ``value`` (the site's batch shape plus ``event_dims`` trailing dims)."""
        nesting = self.max_plate_nesting + 1  # batch dims, particle dim included
        mask, scale = site["mask"], site["scale"]
        frame = self.data_frame
        if (  # the common case, a view: a site of batch shape (B,) or (K, B) in the data plate
            frame is not None
            and frame.dim == -1
            and (mask is None or mask is True)
            and not isinstance(scale, torch.Tensor)
            and scale == self.data_scale
            and self.is_local(site)
        ):
            shape = value.shape[: value.dim() - event_dims]
            if len(shape) in (1, nesting) and len(shape) <= 2 and shape[-1] == frame.size > 0:
                return value.reshape(shape[0] if len(shape) == 2 else 1, shape[-1], -1)
        if event_dims:
            value = value.reshape(value.shape[: value.dim() - event_dims] + (-1,))
        else:
            value = value.unsqueeze(-1)
        batch_ndim = value.dim() - 1
        if batch_ndim > nesting:
            raise ValueError(
                f"site '{site['name']}' has batch shape {tuple(value.shape[:-1])} with more "
                f"dimensions than its plates allow ({nesting}); declare its independent "
                "dimensions with .to_event() or pyro.plate"
            )
        value = value.reshape((1,) * (nesting - batch_ndim) + value.shape)
        mask = site["mask"]
        if mask is not None and mask is not True:
            if mask is False:
                value = torch.zeros_like(value)
            else:
                mask = mask.reshape((1,) * (nesting - mask.dim()) + mask.shape + (1,))
                value = torch.where(mask, value, value.new_zeros(()))
        local = self.is_local(site)
        scale = site["scale"]
        if local and self.data_scale != 1.0:
            scale = scale / self.data_scale
        if isinstance(scale, torch.Tensor):
            if scale.dim():
                scale = scale.reshape((1,) * (nesting - scale.dim()) + scale.shape + (1,))
            value = value * scale
        elif scale != 1.0:
            value = value * scale
        keep = {0}
        data_dim = 0 if self.data_frame is None else int(self.data_frame.dim or 0)
        if local:
            keep.add(nesting + data_dim)
        sum_dims = [d for d in range(nesting) if d not in keep]
        if sum_dims:
            value = value.sum(sum_dims, keepdim=True)
        if not local:
            return value.reshape(value.shape[0], 1, value.shape[-1])
        batch = value.shape[nesting + data_dim]
        value = value.reshape(value.shape[0], batch, value.shape[-1])
        return value.expand(value.shape[0], self.batch_size, value.shape[-1])


def detach_distribution(fn: Any) -> Any:
    """A copy of a distribution whose parameters are cut from the graph (for STL and DReG).

    Tensors held by the distribution (and by nested distributions and transforms) are
    detached; sample values keep their own graph, so only the path through ``z`` carries
    gradient.
    """
    clone = copy.copy(fn)
    for key, item in list(vars(clone).items()):
        setattr(clone, key, _detached(item))
    return clone


def _detached(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return item.detach()
    if isinstance(item, torch.distributions.Distribution | torch.distributions.Transform):
        return detach_distribution(item)
    if isinstance(item, list | tuple):
        return type(item)(_detached(i) for i in item)
    return item


@dataclass
class LogWeights:
    """Log importance weights split into per-datapoint and global parts.

    ``local``: ``(K, B)`` sum over the data-plate sites of log p - log q, unscaled;
    ``global_``: ``(K,)`` sum over the other sites, counted once;
    ``data_scale``: the data plate's N/B;
    ``global_latents``: names of guide latents outside the data plate.
    The full-data log weight of particle ``k`` is ``data_scale * local[k].sum() + global_[k]``.
    """

    local: torch.Tensor
    global_: torch.Tensor
    data_scale: float
    global_latents: tuple[str, ...] = ()

    def per_datapoint(self, engine: str) -> LogWeights:
        """Weights whose log-mean-exp over particles may be taken per datapoint.

        With global latents every particle carries its own global draw, so the per-datapoint
        log-mean-exp is not a bound on log p(X): the weights of the whole batch are joined into
        one (exact IWAE on the full batch). Under subsampling that joint weight is unknown, and
        an error says so.
        """
        if not self.global_latents:
            return self
        if self.data_scale != 1.0:
            raise ValueError(
                f"{engine} cannot bound log p(x) under a subsampled data plate when the guide has "
                f"global latents ({', '.join(self.global_latents)}): their weights do not "
                "factorise over datapoints. Use the ELBO, or train on full batches"
            )
        joint = self.local.sum(-1, keepdim=True) + self.global_[:, None]
        return LogWeights(joint, torch.zeros_like(self.global_), 1.0)

    @staticmethod
    def cat(parts: list[LogWeights]) -> LogWeights:
        """Join the weights of separately drawn particles (non-vectorised runs)."""
        return LogWeights(
            torch.cat([p.local for p in parts]),
            torch.cat([p.global_ for p in parts]),
            parts[0].data_scale,
            parts[0].global_latents,
        )


def log_mean_exp(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(mean(exp(value), dim))`` computed stably."""
    return torch.logsumexp(value, dim) - math.log(value.shape[dim])


def latent_names(trace: Trace) -> list[str]:
    """The names of the trace's latent (unobserved) sample sites, in sampling order."""
    return [
        name
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"]
    ]


def trace_guide_site(guide: Callable, args: tuple, kwargs: dict, site: str) -> tuple[Site, list]:
    """Run ``guide(*args, **kwargs)`` once (parameters kept out of the trace) and return the
    node of its latent ``site`` and the names of the latents sampled before it; a missing
    site is an error that names the guide's latents."""
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **kwargs)
    latents = latent_names(trace)
    if site not in latents:
        raise ValueError(
            f"the guide has no latent site {site!r}; its latent sites are: "
            f"{', '.join(latents) or 'none'}"
        )
    return trace.nodes[site], latents[: latents.index(site)]


def latent_sites(model_trace: Trace, guide_trace: Trace) -> Iterable[tuple[str, Site, Site]]:
    """Yield ``(name, guide_site, model_site)`` for every latent site of the guide."""
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] != "sample" or guide_site["is_observed"]:
            continue
        if (guide_site["infer"] or {}).get("is_auxiliary"):
            continue
        model_site = model_trace.nodes.get(name)
        if model_site is None:
            raise ValueError(
                f"guide site '{name}' does not appear in the model; every latent the guide "
                "samples must be sampled by the model under the same name"
            )
        yield name, guide_site, model_site


def trace_params(trace: Trace) -> dict[str, torch.Tensor]:
    """The unconstrained tensors of the parameters a trace touched, by name."""
    return {
        name: site["value"].unconstrained()  # type: ignore[union-attr]
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


# --------------------------------------------------------------------------------------------
# Which parameters are the model's and which the guide's.
#
# Ownership follows use, not registration: Pyro's own examples register every network in the
# model (``pyro.module("name", self)``), encoder included, so the traces' param sites do not
# say which side a parameter is on. Use is read from the autograd graph: a parameter is
# reached from the guide's latent sites (their values and log densities), and/or from the
# model's log densities by a path that does not go through the guide's samples.


def _reached(outputs: list, params: dict[str, torch.Tensor], stop: Iterable = ()) -> set[str]:
    """The names of ``params`` reachable in the autograd graph from ``outputs`` without
    passing through a tensor of ``stop`` (a walk of the graph: nothing is computed)."""
    by_id = {id(p): name for name, p in params.items()}
    stop_nodes, stop_leaves = set(), set()
    for tensor in stop:
        if tensor.grad_fn is not None:
            stop_nodes.add(tensor.grad_fn)
        else:
            stop_leaves.add(id(tensor))
    found: set[str] = set()
    seen: set = set()
    nodes: list = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn]
    found.update(by_id[id(o)] for o in outputs if id(o) in by_id and id(o) not in stop_leaves)
    while nodes:
        node = nodes.pop()
        if node is None or node in seen or node in stop_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None and id(variable) not in stop_leaves and id(variable) in by_id:
            found.add(by_id[id(variable)])
        nodes.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return found


def _guide_latents(guide_trace: Trace) -> list[Site]:
    return [
        site
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"]
    ]


def used_by_guide(guide_trace: Trace, params: dict[str, torch.Tensor]) -> set[str]:
    """The names of ``params`` that the guide's latent sites (values, log densities) use."""
    outputs = []
    for site in _guide_latents(guide_trace):
        outputs += [site["value"], site["fn"].log_prob(site["value"])]  # type: ignore[attr-defined]
    return _reached(outputs, params)


def used_by_model(
    model_trace: Trace, guide_trace: Trace, params: dict[str, torch.Tensor]
) -> set[str]:
    """The names of ``params`` that the model's log densities use directly, not through the
    guide's samples (``model_trace`` replayed on ``guide_trace``)."""
    outputs = [
        site["fn"].log_prob(site["value"])  # type: ignore[attr-defined]
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
    ]
    stop = [s["value"] for s in _guide_latents(guide_trace) if isinstance(s["value"], torch.Tensor)]
    return _reached(outputs, params, stop)


def split_params(
    model_params: dict[str, torch.Tensor],
    guide_params: dict[str, torch.Tensor],
    guide_uses: set[str],
    model_uses: set[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The ownership rule. ``model_params``/``guide_params``: what each trace touched;
    ``guide_uses``/``model_uses``: the names each side uses (:func:`used_by_guide`,
    :func:`used_by_model`).

    A parameter is the guide's when the guide's latent sites use it (or only the guide's trace
    touches it) and the model's densities do not use it directly, whoever registered it. A
    parameter both sides use (a prior network that a ladder guide merges with, a prior used as
    a proposal) stays the model's: engines that give the guide its own objective (PIWAE,
    DReG) would otherwise train a part of the generative model with the guide's objective.

    :returns: ``(model_params, guide_params)``, guide first in the order the pair touches them.
    """
    touched = {**guide_params, **model_params}
    guide = {
        name: p
        for name, p in touched.items()
        if (name in guide_uses or name not in model_params) and name not in model_uses
    }
    model = {name: p for name, p in touched.items() if name not in guide}
    return model, guide


class _OwnParams(Messenger):
    """Checks that ``pyro.param(name, module_parameter)`` hands back the module's own tensor.

    ``pyro.module(name, m)`` and a ``PyroModule``'s ``nn.Parameter`` attributes call
    ``pyro.param`` with the module's parameter as initial value. Pyro's parameter store is
    global and keyed by name: when a parameter of that name is already stored (an earlier
    model built with the same name), the store returns its own tensor, the module keeps using
    its parameter, and an optimiser of the traced parameters would train the other model's.
    """

    def _postprocess_message(self, msg: Any) -> None:
        if msg["type"] != "param" or len(msg["args"]) < 2:
            return
        own = msg["args"][1]
        if not isinstance(own, torch.nn.Parameter):
            return
        value = msg["value"]
        stored = value.unconstrained() if hasattr(value, "unconstrained") else value
        if stored is not own:
            name = msg["name"]
            raise ValueError(
                f"parameter {name!r} in Pyro's parameter store is not the tensor its module "
                "holds: Pyro's store is global and keyed by name, and an earlier module "
                f"registered {name!r} first (two models built with the same name, or a store "
                "loaded from a file), so training would update the other tensor while this "
                "module keeps its own. Give each model its own name (pyro.module(name, ...) or "
                "the model's name argument) or call pyro.clear_param_store() before building it"
            )


def param_split(
    model: Callable, guide: Callable, args: tuple, kwargs: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The pair's parameters (created if new), split by use (:func:`split_params`), from one
    run of the guide (with gradients) and of the model replayed on it (without), blocked, with
    torch's random state left as found. ``pvae.fit`` calls it once, before training.

    Also checks that every module parameter the pair registers is the tensor Pyro's store
    hands back (else a ValueError naming it: two models with one name), and warns when a
    parameter feeds both the guide's latents and the model's densities directly (it is then
    trained as the guide's); only when the model touches some of the guide's parameters is it
    run a second time, with gradients, to tell.

    :returns: ``(model_params, guide_params)``: unconstrained tensors by name, guide first in
        the order the pair touches them.
    """
    kwargs = kwargs or {}
    with poutine.block(), torch.random.fork_rng(devices=[]):
        with _OwnParams(), torch.enable_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.trace(poutine.replay(model, trace=guide_trace))
        with _OwnParams(), torch.no_grad():
            model_trace = replayed.get_trace(*args, **kwargs)
        guide_params, model_params = trace_params(guide_trace), trace_params(model_trace)
        params = {**guide_params, **model_params}
        guide_uses = used_by_guide(guide_trace, params)
        # only when the model touches some of the guide's parameters (registered there, or
        # used) is it run again, with gradients, to see which it uses itself
        suspects = {name: params[name] for name in guide_uses if name in model_params}
        model_uses: set[str] = set()
        if suspects:
            with torch.enable_grad():
                model_trace = replayed.get_trace(*args, **kwargs)
            model_uses = used_by_model(model_trace, guide_trace, suspects)
    declared = declared_shared(model, guide)
    both = {name for name in guide_uses & model_uses if not is_declared(name, declared)}
    if both:
        warnings.warn(
            f"parameters {sorted(both)} feed both the guide's latent sites and the model's "
            "densities; they are trained as the model's (engines that give the guide its own "
            "objective, PIWAE and DReG, give them the model's)",
            stacklevel=2,
        )
    return split_params(model_params, guide_params, guide_uses, model_uses)


def check_reparameterized(guide_trace: Trace, engine: str) -> None:
    """Raise a clear error if a guide latent has no reparameterised sampler."""
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:  # type: ignore[attr-defined]
            raise ValueError(
                f"{engine} needs reparameterised guide samples, but guide site '{name}' "
                f"({type(site['fn']).__name__}) has no rsample; use a continuous relaxation or "
                "Pyro's TraceEnum_ELBO for discrete latents"
            )


def log_weights(
    model_trace: Trace,
    guide_trace: Trace,
    reducer: Reducer,
    detach_guide: bool = False,
) -> LogWeights:
    """Log p(x, z) - log q(z | x) of each particle, split into local and global parts.

    Model sites count when observed or when the guide samples them (a latent the model draws
    from its own prior cancels from the weight). With ``detach_guide`` the guide's densities
    are evaluated with its parameters detached (STL, DReG).
    """
    num_particles = 1
    global_latents: list[str] = []
    local: torch.Tensor | float = 0.0
    global_: torch.Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            continue
        term = reducer(site["fn"].log_prob(site["value"]), site)  # type: ignore[attr-defined]
        local, global_ = _accumulate(local, global_, term, reducer.is_local(site), +1)
        num_particles = max(num_particles, term.shape[0])
    for name, guide_site, _ in latent_sites(model_trace, guide_trace):
        if not reducer.is_local(guide_site):
            global_latents.append(name)
        fn = detach_distribution(guide_site["fn"]) if detach_guide else guide_site["fn"]
        term = reducer(fn.log_prob(guide_site["value"]), guide_site)
        local, global_ = _accumulate(local, global_, term, reducer.is_local(guide_site), -1)
        num_particles = max(num_particles, term.shape[0])
    shape = (num_particles, reducer.batch_size)
    local_t = local.expand(shape) if isinstance(local, torch.Tensor) else torch.zeros(shape)
    global_t = global_ if isinstance(global_, torch.Tensor) else local_t.new_zeros(1)
    return LogWeights(
        local_t, global_t.expand(num_particles), reducer.data_scale, tuple(global_latents)
    )


def _accumulate(local, global_, term: torch.Tensor, is_local: bool, sign: int):
    term = term.sum(-1)  # (K', B')
    if is_local:
        local = local + sign * term
    else:
        global_ = global_ + sign * term[:, 0]
    return local, global_


# --------------------------------------------------------------------------------------------
# Closed-form expectations that only an ELBO may use.

EXPECTED_LOG_PROB = "expected_log_prob"


def expected_log_prob(site: Site) -> torch.Tensor | None:
    """The closed-form ``E_q[log p(x | z)]`` an observed site declares, or None.

    A model may attach, to an observed site that keeps its true density, a zero-argument
    callable returning that expectation under the guide (the site's batch shape, e.g.
    ``(B,)``): ``pyro.sample("y", fn, obs=y, infer={"expected_log_prob": closure})``. Only an
    ELBO may put it in place of ``log p(x | z)`` at the guide's draw (same value in expectation,
    no Monte-Carlo noise in that term); importance-weighted bounds and the log-likelihood
    estimator need the density at each draw and read ``fn.log_prob`` as for any site, so the
    declaration never changes what they compute. Mask and scale apply as to ``log_prob``.
    """
    value = (site.get("infer") or {}).get(EXPECTED_LOG_PROB)
    if value is None:
        return None
    if not callable(value):
        raise TypeError(
            f"site '{site['name']}': infer['{EXPECTED_LOG_PROB}'] must be a callable returning "
            f"E_q[log p] (a tensor), got {type(value).__name__}"
        )
    result = value()
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"site '{site['name']}': infer['{EXPECTED_LOG_PROB}']() must return a tensor, "
            f"got {type(result).__name__}"
        )
    return result


# --------------------------------------------------------------------------------------------
# Scaled latent sites: a weighted objective, not a bound.

SCALED_LATENTS = "surrogate: scaled latent sites"
"""``bound_source`` when latent sites carry a scale of their own (``poutine.scale``)."""


def _relative_scale(site: Site, data_frame: CondIndepStackFrame | None) -> Any:
    """The site's scale without the data plate's N/B factor: a float, or a tensor."""
    scale = site["scale"]
    frame = data_frame
    local = frame is not None and any(
        f.name == frame.name and f.dim == frame.dim for f in site["cond_indep_stack"]
    )
    if local and frame is not None and frame.full_size not in (None, frame.size):
        scale = scale / (float(frame.full_size) / float(frame.size))
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1 or bool((scale == scale.reshape(-1)[0]).all()):
            return float(scale.reshape(-1)[0])
        return scale.detach()
    return float(scale)


def _same_scale(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        try:
            a, b = torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b))
        except RuntimeError:
            return False
        return bool(torch.allclose(a.double(), b.double(), rtol=1e-9, atol=0))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def scaled_latent_sites(
    model_trace: Trace, guide_trace: Trace, plate: str = DATA_PLATE
) -> dict[str, Any]:
    """Latent sites whose scale (``poutine.scale``, beyond the data plate's N/B) matches the
    scale of no observed site, by name, with that scale (a float or a tensor).

    The log densities of such a site count a weighted number of times (KL annealing as in
    Pyro's DMM example, a per-layer beta, a KL weight), so what an engine computes is a
    weighted objective, not a bound on log p(x). Scaling a whole sub-pair (its latents and its
    observations by one weight, e.g. a convex mixture of two objectives) is not flagged.
    ``plate``: the data plate's name.
    """
    frame = find_data_frame(guide_trace, model_trace, plate=plate)
    observed = [
        _relative_scale(site, frame)
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
    ] or [1.0]
    found: dict[str, Any] = {}
    for name, guide_site, model_site in latent_sites(model_trace, guide_trace):
        for site in (model_site, guide_site):
            scale = _relative_scale(site, frame)
            if not any(_same_scale(scale, other) for other in observed):
                found[name] = scale
                break
    return found


def describe_scales(found: dict[str, Any]) -> str:
    """``"'z' (scale 0.2), ..."`` for :func:`scaled_latent_sites`' result."""
    parts = []
    for name, scale in found.items():
        value = f"{scale:g}" if isinstance(scale, float) else "a per-element tensor"
        parts.append(f"{name!r} (scale {value})")
    return ", ".join(parts)


# -- declared sharing of parameters between model and guide ---------------------------------


def declared_shared(model: Callable, guide: Callable) -> tuple[str, ...]:
    """The Pyro parameter names (or name prefixes) that the pair declares as meant to feed
    both the guide's latent sites and the model's densities.

    A pair declares them through the object its ``model`` or ``guide`` is a bound method of:
    a method (or attribute) ``shared_parameters`` returning names such as ``"svae.dynamics"``
    (a prefix covers ``"svae.dynamics.generator_raw"`` ...). A structured guide that runs the
    prior's smoother, or a ladder guide that evaluates the prior's top-down networks, shares
    them by design; :func:`param_split` warns only about shared parameters not declared.
    """
    names: list[str] = []
    for fn in (model, guide):
        declared = _declared(fn, "shared_parameters")
        if declared:
            names.extend(str(name) for name in declared)
    return tuple(dict.fromkeys(names))


def declares_monte_carlo_kl(model: Callable, guide: Callable) -> bool:
    """Whether the pair declares that its guide samples the latents in another order than the
    model by design (a bottom-up guide of a top-down hierarchy), so that the KL terms are
    Monte-Carlo estimates: ``monte_carlo_kl`` (an attribute or method) of the object that
    ``model`` or ``guide`` is a bound method of is True. The ELBO engine then falls back to
    Monte-Carlo KL estimates without its warning about the order."""
    return any(bool(_declared(fn, "monte_carlo_kl")) for fn in (model, guide))


def _declared(fn: Any, attribute: str) -> Any:
    """``attribute`` of the object ``fn`` is a bound method of, looked up through wrappers
    (``functools.wraps``, ``functools.partial`` and Pyro's handlers such as
    :func:`scale_to_data`, whose partials hold the wrapped function among their arguments),
    called if callable; None when no owner has it."""
    queue, seen = [fn], 0
    while queue and seen < 16:
        fn = queue.pop(0)
        seen += 1
        owner = getattr(fn, "__self__", None)
        if owner is not None and hasattr(owner, attribute):
            value = getattr(owner, attribute)
            return value() if callable(value) else value
        for inner in (getattr(fn, "__wrapped__", None), getattr(fn, "func", None)):
            if callable(inner) and inner is not fn:
                queue.append(inner)
        queue.extend(arg for arg in getattr(fn, "args", ()) or () if callable(arg))
    return None


def is_declared(name: str, declared: Iterable[str]) -> bool:
    """Whether parameter ``name`` is one of ``declared`` or under one of them: a module name
    given to ``pyro.module`` covers its parameters (``"svae.dynamics$$$generator_raw"``, in
    Pyro's ``module$$$parameter`` naming) and its submodules' (``"svae.dynamics.sub..."``)."""
    return any(
        name == prefix or name.startswith((prefix + ".", prefix + "$$$")) for prefix in declared
    )


# -- what a sequence model offers -------------------------------------------------------------


@runtime_checkable
class SequenceVAE(Protocol):
    """A VAE over sequences of frames: the pair and three conveniences, one signature each.

    Data: ``values (B, T, *event_shape)`` floating point (hidden frames may hold anything,
    NaN included: they are never read), ``times (B, T)`` strictly increasing per sequence (or
    ``(T,)`` shared; None: the model's default spacing), ``mask (B, T)`` bool, True =
    observed (None: every frame). The order is the pair's own, so ``model.impute(*split)``
    works for a :class:`pvae.data.SequenceSplit` ``(values, times, mask)``. A model may take
    further keyword arguments after these (the GP-VAE's per-entry ``observed``, a forecast's
    ``gap``).

    - ``model(values, times=None, mask=None)`` and ``guide(...)``: the Pyro pair, per-sequence
      sites inside ``pyro.plate("data")``.
    - ``impute(values, times=None, mask=None) -> (B, T, *event_shape)``: the observed frames
      as given, the hidden ones the decoded posterior mean.
    - ``forecast(values, steps, times=None, mask=None) -> (B, steps, *event_shape)``: decoded
      means of the ``steps`` frames after each sequence, given its observed frames.
    - ``sample(num_steps, num_samples=1, times=None) -> (num_samples, num_steps, x_dim)``:
      decoded means of paths drawn from the prior (frames flattened), at ``times (num_steps,)``
      or the model's default spacing.

    :func:`pvae.metrics.imputation_error` scores ``impute`` for any such model.
    """

    def model(
        self, values: torch.Tensor, times: torch.Tensor | None = None, mask: Any = None
    ) -> Any: ...

    def guide(
        self, values: torch.Tensor, times: torch.Tensor | None = None, mask: Any = None
    ) -> Any: ...

    def impute(
        self,
        values: torch.Tensor,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def forecast(
        self,
        values: torch.Tensor,
        steps: int,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def sample(
        self, num_steps: int, num_samples: int = 1, times: torch.Tensor | None = None
    ) -> torch.Tensor: ...
