"""The log joint of a model with a fixed structure, evaluated without Pyro's trace: the
potential U(theta) = -log p(x, theta) of a stochastic-gradient sampler.

A sampler evaluates the log joint of the same model at every step, with new latent values and
a new minibatch. :class:`Potential` learns the model's latent sites once (from a trace) and
then runs the model under one light effect handler, :class:`FastLogJoint`, that substitutes the
latent values and sums the log densities: no trace, no copies, and

- *closed-form priors*: a latent site whose distribution is a Normal with constant parameters
  (no gradient flows into them), possibly expanded and made an event, whose support needs no
  transform, and whose distribution object is *the same object* on every call (a
  ``PyroSample`` attribute of a ``PyroModule`` holding a distribution, as the zoo's
  ``BayesianAE``) gets its log density from :class:`_NormalLogDensity`: one dot product
  forward and one fused product backward per site, instead of the five elementwise passes
  (and their five backward nodes) of ``Normal.log_prob`` on every weight. The same numbers
  to rounding (the sum is taken in another order);
- *the scale applied once*: a site whose scale is a number (the data plate's N/B) has its
  log density summed, then multiplied by the scale (one scalar product, not one per datapoint);
- *Normal sites with one scale* (a regression's likelihood ``Normal(x @ w, sigma)`` with a
  fixed sigma, a prior rebuilt at every call): the summed log density as one subtraction and
  one dot product (:func:`normal_sum`).

Every other site gets ``fn.log_prob(value)`` with its scale and mask, exactly as the traced
log joint does.

**Structure checks** (what is compared on every call, each an O(1) Python comparison per site,
no tensor work): the sequence of non-subsample sample-site names, and for each closed-form
site whether its distribution is the very object learned (``is``). A site sequence different
from the learned one (sites added, removed or reordered; a site that was observed turned
latent is refused by the caller) counts as a structure change: the call's value is still
right, since every site not matching the learned object falls back to its own ``log_prob`` on
that call, and the potential re-learns its closed-form sites from that call's distributions
(``rebuilds`` counts them). Shapes, plates and batch sizes need no check of their own: a
closed-form site's shape is the shape of its latent value (fixed for a chain), and any change
in a distribution's shape or parameters is a new distribution object, which takes the
``log_prob`` path. A distribution object mutated in place (its ``loc`` tensor written into)
is not detected: distributions are treated as immutable, as Pyro and torch do.

The ELBO engine's fast path uses the same idea with other handlers: :class:`SiteRecorder` keeps
the guide's and the model's sample-site messages (replaying the guide's values into the model)
without a ``Trace``, and :func:`site_signature` is the structure compared between draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, Normal

__all__ = [
    "ClosedForm",
    "FastLogJoint",
    "LightTrace",
    "Potential",
    "SiteRecorder",
    "closed_form",
    "normal_sum",
    "site_signature",
]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class ClosedForm:
    """The log density of a Normal prior with constant parameters on one latent site.

    ``log p(v) = c - sum(a * (v - loc)^2)`` with ``a = 1 / (2 scale^2)`` and
    ``c = sum(-log scale - log(2 pi) / 2)`` over the site's elements, both precomputed.

    :param fn: the site's distribution (kept to check identity on later calls).
    :param loc: the Normal's loc, broadcastable to ``shape`` (None when it is all zeros).
    :param half_precision: ``a``, a Python number when the scale is one number, else a tensor
        broadcastable to ``shape``.
    :param constant: ``c``, a 0-dim tensor of the site's dtype.
    """

    __slots__ = ("fn", "loc", "half_precision", "constant")

    def __init__(
        self, fn: Any, loc: torch.Tensor | None, half_precision: Any, constant: torch.Tensor
    ):
        self.fn = fn
        self.loc = loc
        self.half_precision = half_precision
        self.constant = constant


def closed_form(fn: Any, shape: Sequence[int]) -> ClosedForm | None:
    """A :class:`ClosedForm` for a site of ``shape`` with distribution ``fn``, or None when
    ``fn`` is not a Normal (``torch`` or Pyro's, possibly wrapped in ``Independent`` and
    ``ExpandedDistribution``) with constant parameters and the site's full shape."""
    base = _unwrap(fn)
    if not isinstance(base, Normal) or type(base).log_prob is not Normal.log_prob:
        return None
    loc, scale = base.loc, base.scale
    if not isinstance(loc, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return None
    if loc.requires_grad or scale.requires_grad or fn.batch_shape + fn.event_shape != shape:
        return None
    shape = torch.Size(shape)
    try:
        torch.broadcast_shapes(loc.shape, scale.shape, shape)
    except RuntimeError:
        return None
    if torch.broadcast_shapes(loc.shape, scale.shape, shape) != shape:
        return None
    with torch.no_grad():
        numel = math.prod(shape)
        if _one_number(scale):  # one number, or one number broadcast (zero strides)
            one = scale.reshape(-1)[0]
            sd = float(one)
            half_precision: Any = 0.5 / (sd * sd)
            constant = (-one.log() - _HALF_LOG_TWO_PI) * numel
        else:
            half_precision = 0.5 / scale.square()
            constant = (-scale.log() - _HALF_LOG_TWO_PI).expand(shape).sum()
        zero = bool((loc == 0).all())
    return ClosedForm(fn, None if zero else loc, half_precision, constant)


class _NormalLogDensity(torch.autograd.Function):
    """``c - sum(a * (v - loc)^2)``, its gradient ``-2 a (v - loc)`` written out."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, form: ClosedForm) -> torch.Tensor:  # type: ignore[override]
        centred = value if form.loc is None else value - form.loc
        a = form.half_precision
        if isinstance(a, float):
            flat = centred.reshape(-1)
            quad = torch.dot(flat, flat) * a
        else:
            quad = (centred.square() * a).sum()
        ctx.save_for_backward(centred)
        ctx.half_precision = a
        return form.constant - quad

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (centred,) = ctx.saved_tensors
        return centred * (-2 * ctx.half_precision * grad), None


def normal_log_density(value: torch.Tensor, form: ClosedForm) -> torch.Tensor:
    """The closed-form log density of ``value`` (differentiable in ``value``); a 0-dim tensor."""
    return _NormalLogDensity.apply(value, form)  # type: ignore[no-untyped-call]


def _one_number(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is one stored number (one element, or a view that
    broadcasts one: zero strides, as ``expand`` and ``broadcast_all`` make)."""
    return tensor.numel() == 1 or all(stride == 0 for stride in tensor.stride())


def _unwrap(fn: Any) -> Any:
    """The distribution under ``Independent`` and ``ExpandedDistribution`` wrappers."""
    while True:
        if isinstance(fn, Independent):
            fn = fn.base_dist
        elif type(fn).__name__ == "ExpandedDistribution" and hasattr(fn, "base_dist"):
            fn = fn.base_dist
        else:
            return fn


def normal_sum(fn: Any, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value).sum()`` for a Normal (possibly expanded, made an event) with one
    scale for every element (one number, or one number broadcast) that no gradient flows
    into, written as ``-sum((value - loc)^2) / (2 scale^2) - n (log scale + log(2 pi) / 2)``:
    a subtraction and a dot product instead of ``Normal.log_prob``'s seven elementwise
    operations. None when
    ``fn`` is not such a Normal, or ``value`` does not have the distribution's full shape."""
    base = _unwrap(fn)
    if not isinstance(base, Normal) or type(base).log_prob is not Normal.log_prob:
        return None
    scale = base.scale
    if scale.requires_grad or value.shape != fn.batch_shape + fn.event_shape:
        return None
    if not _one_number(scale):
        return None
    sd = float(scale.reshape(-1)[0])
    centred = (value - base.loc).reshape(-1)
    constant = value.numel() * (math.log(sd) + _HALF_LOG_TWO_PI)
    return torch.dot(centred, centred) * (-0.5 / (sd * sd)) - constant


class FastLogJoint(Messenger):
    """Runs a model at given latent values and sums the log density of every sample site,
    closed-form sites through their :class:`ClosedForm` when the site's distribution is the
    learned object (see the module's docstring).

    :param values: latent site name -> value (constrained), substituted as observations.
    :param forms: latent site name -> :class:`ClosedForm`.

    After the run: ``total`` (None when no site ran), ``sites`` (the non-subsample sample
    sites' names in order), ``seen`` (latent sites substituted), ``unknown`` (latent sites not
    in ``values``), ``changed`` (closed-form sites whose distribution was another object).
    """

    def __init__(self, values: Mapping[str, torch.Tensor], forms: Mapping[str, ClosedForm]):
        super().__init__()
        self.values = values
        self.forms = forms
        self.total: torch.Tensor | None = None
        self.sites: list[str] = []
        self.seen: set[str] = set()
        self.unknown: list[str] = []
        self.changed: list[str] = []
        self.distributions: dict[str, Any] = {}

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        name = msg["name"]
        if name in self.values:
            msg["value"] = self.values[name]
            msg["is_observed"] = True
            self.seen.add(name)
        elif not msg["is_observed"] and not site_is_subsample(msg):
            self.unknown.append(name)

    def _postprocess_message(self, msg: Any) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        name = msg["name"]
        self.sites.append(name)
        fn, scale, mask = msg["fn"], msg["scale"], msg["mask"]
        if name in self.values:
            self.distributions[name] = fn
        form = self.forms.get(name)
        if form is not None and mask is None:
            if fn is form.fn:
                term = normal_log_density(msg["value"], form)
                if not (isinstance(scale, float | int) and scale == 1):
                    term = term * scale
                self._add(term)
                return
            self.changed.append(name)
        if mask is None and isinstance(scale, float | int):
            fast = normal_sum(fn, msg["value"])
            term = fn.log_prob(msg["value"]).sum() if fast is None else fast
            if scale != 1:
                term = term * scale
        else:
            term = scale_and_mask(fn.log_prob(msg["value"]), scale, mask).sum()
        self._add(term)

    def _add(self, term: torch.Tensor) -> None:
        self.total = term if self.total is None else self.total + term


class Potential:
    """The log joint of a model's fixed structure over its latent values, learned once.

    :param latent: latent site name -> (distribution at the learning run, value's shape) for
        the sites whose support needs no transform (candidates for the closed form).
    :param sites: the non-subsample sample sites' names in the order the model runs them (the
        structure signature).

    A closed-form site whose distribution is another object on one call is learned again from
    it (a prior replaced between calls, ``BayesianAE.set_prior_scale``); one whose distribution
    is a new object on two calls in a row (a model that builds its prior at every call) is
    computed by ``log_prob`` from then on (``volatile``). ``builds`` counts the learning runs
    of the whole structure (1 after construction), ``rebuilds`` the structure changes seen
    since (another site sequence), ``relearned`` the single sites learned again.
    """

    def __init__(self, latent: Mapping[str, tuple[Any, Sequence[int]]], sites: Sequence[str]):
        self.forms: dict[str, ClosedForm] = {}
        self.sites: tuple[str, ...] = ()
        self.shapes = {name: tuple(shape) for name, (_, shape) in latent.items()}
        self.volatile: set[str] = set()
        self._changed: set[str] = set()
        self.builds = 0
        self.rebuilds = 0
        self.relearned = 0
        self.learn({name: fn for name, (fn, _) in latent.items()}, sites)

    @classmethod
    def from_trace(cls, trace: Any, names: Sequence[str], identity: Sequence[bool]) -> Potential:
        """Learn from a ``poutine.trace`` of the model: ``names`` the latent sites, and whether
        each one's support needs no transform (``identity``)."""
        latent = {
            name: (trace.nodes[name]["fn"], tuple(trace.nodes[name]["value"].shape))
            for name, plain in zip(names, identity, strict=True)
            if plain
        }
        sites = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        ]
        return cls(latent, sites)

    def learn(self, distributions: Mapping[str, Any], sites: Sequence[str]) -> None:
        """(Re)learn the closed-form sites from their distributions, and the signature."""
        forms = {}
        for name, fn in distributions.items():
            if name in self.shapes and name not in self.volatile:
                form = closed_form(fn, self.shapes[name])
                if form is not None:
                    forms[name] = form
        self.forms = forms
        self.sites = tuple(sites)
        self.builds += 1

    def run(
        self, model: Callable, values: Mapping[str, torch.Tensor], args: tuple, kwargs: Mapping
    ) -> FastLogJoint:
        """Run ``model(*args, **kwargs)`` at ``values``; returns the handler (its ``total`` the
        log joint without Jacobians). The value is right whatever the structure; a structure
        change is learned from this run for the next calls (see the class docstring)."""
        handler = FastLogJoint(values, self.forms)
        with handler:
            model(*args, **kwargs)
        if tuple(handler.sites) != self.sites:
            self.rebuilds += 1
            self.learn(handler.distributions, handler.sites)
        elif handler.changed:
            changed = set(handler.changed)
            for name in changed:
                if name in self._changed:  # a new object on two calls in a row
                    self.volatile.add(name)
                    del self.forms[name]
                    continue
                form = closed_form(handler.distributions[name], self.shapes[name])
                if form is None:
                    del self.forms[name]
                else:
                    self.forms[name] = form
                self.relearned += 1
            self._changed = changed
        elif self._changed:
            self._changed = set()
        return handler


class LightTrace:
    """The sample sites of one run of a model or guide, as :class:`SiteRecorder` kept them:
    ``nodes`` maps each non-subsample sample site's name to its message (a copy, as
    ``poutine.trace`` keeps), in the order the sites ran. It stands in for a pruned
    ``poutine.trace`` wherever only the sample sites are read (``trace.nodes``)."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: dict[str, Any]):
        self.nodes = nodes


class SiteRecorder(Messenger):
    """One light handler in place of ``poutine.trace`` (and ``poutine.replay``): it keeps a
    copy of every non-subsample sample site's message, and with ``replay`` (the guide's
    recorded sites) it substitutes the guide's value (and ``infer``) at every latent site of
    the same name, as ``poutine.replay`` does. No ``Trace`` object, no graph, no parameter,
    input or return nodes, no pruning pass.

    The same checks as Pyro's: two sample sites of one name, and a latent site the guide
    observed, raise ``RuntimeError``. Sites marked ``_do_not_trace`` are skipped as
    ``poutine.trace`` skips them. Subsample sites (a plate's indices) are kept apart, in
    :attr:`subsamples`, and replayed from ``subsamples`` as the traced path replays them: a
    plate that subsamples itself draws the guide's indices in the model.
    """

    def __init__(
        self,
        replay: Mapping[str, Any] | None = None,
        subsamples: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.replay = replay
        self.replay_subsamples = {} if subsamples is None else subsamples
        self.nodes: dict[str, Any] = {}
        self.subsamples: dict[str, Any] = {}

    def _process_message(self, msg: Any) -> None:
        if self.replay is None or msg["type"] != "sample" or msg["is_observed"]:
            return
        if site_is_subsample(msg):
            indices = self.replay_subsamples.get(msg["name"])
            if indices is not None:
                msg["done"] = True
                msg["value"] = indices
            return
        guide_site = self.replay.get(msg["name"])
        if guide_site is None:
            return
        if guide_site["is_observed"]:
            raise RuntimeError(f"site {msg['name']} must be sampled in trace")
        msg["done"] = True
        msg["value"] = guide_site["value"]
        msg["infer"] = guide_site["infer"]

    def _postprocess_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        if site_is_subsample(msg):
            self.subsamples[msg["name"]] = msg["value"]
            return
        if msg["infer"].get("_do_not_trace"):
            return
        name = msg["name"]
        if name in self.nodes:
            raise RuntimeError(f"Multiple sample sites named '{name}'")
        self.nodes[name] = msg.copy()


def site_signature(nodes: Mapping[str, Any]) -> tuple:
    """What fixes a run's structure, site by site: name, observed or not, distribution type
    (and that of its base under ``Independent``), batch and event shapes, the value's shape,
    the plates (their frames: name, dim, size, full size), the scale (a number, or a tensor's
    identity: a tensor scale never matches another call's), the mask's kind (None, a bool, or a
    tensor of a shape) and whether the distribution has ``rsample``. Two runs with equal
    signatures give equal answers to every structural check an engine makes of its traces."""
    signature = []
    for name, site in nodes.items():
        fn, value, scale, mask = site["fn"], site["value"], site["scale"], site["mask"]
        base = getattr(fn, "base_dist", None)
        signature.append(
            (
                name,
                site["is_observed"],
                type(fn),
                type(base),
                getattr(fn, "batch_shape", None),
                getattr(fn, "event_shape", None),
                getattr(value, "shape", None),
                site["cond_indep_stack"],
                ("tensor", id(scale)) if isinstance(scale, torch.Tensor) else scale,
                ("tensor", mask.shape) if isinstance(mask, torch.Tensor) else mask,
                bool(getattr(fn, "has_rsample", False)),
            )
        )
    return tuple(signature)
