"""Checks that run once, before any work: arguments, data, and the data against the pair.

The rule pvae follows everywhere: bad input is refused before anything is trained, computed
or written, with one ``ValueError``/``TypeError`` whose message names the argument and says
what was expected and what came. Nothing here runs per training step.

- :func:`positive_int`, :func:`non_negative_int`, :func:`finite_float`, :func:`seed_value`:
  scalar arguments (a bool is not an int; ``2.5`` is not an int; NaN is not a float here).
- :func:`as_data`: a tensor, a tuple of tensors (the pair's positional arguments) or a torch
  ``Dataset``; a NumPy array becomes a tensor (floating arrays in torch's default dtype); a
  list of row tensors, empty data, tuples of unequal length or mixed devices, and tensors on
  the meta device (no values) are refused.
- :func:`check_finite`: every floating value finite, else the first bad row and column.
- :func:`check_pair_data`: one run of the pair (guide, then the model replayed on it) on a
  real batch: torch errors from inside the networks become one line naming the argument
  (dtype, shape, device); the per-datapoint sites must sit in ``pyro.plate("data")``; every
  latent the model samples must be sampled by the guide; and every observed site's data must
  lie in its distribution's support, checked on the whole dataset (one vectorised pass).
- :func:`check_times`: the time stamps of sequences, finite and strictly increasing (every
  sequence model and :mod:`pvae.gp` call it; the message names the first offending stamp).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from pvae.protocol import check_data_plate, check_guide_covers_model

Data = Any

# -- scalar arguments -------------------------------------------------------------------------


def device(name: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (``"cuda:1"``) or ``"mps"`` as a :class:`torch.device`, checked.

    :raises ValueError: for another name, or a device this torch cannot use (no CUDA build,
        no GPU, no Apple MPS), saying which.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be cpu, cuda or mps, got {name!r}") from error
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU"
        raise ValueError(f"device {name!r}: CUDA is not available ({why}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: Apple MPS is not available here; use cpu")
    return device


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1; a bool, a non-integral float or NaN is refused."""
    return _int(value, name, 1)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0."""
    return _int(value, name, 0)


def _int(value: Any, name: str, minimum: int) -> int:
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    number: int | None = None
    if isinstance(value, numbers.Integral):
        number = operator.index(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        number = int(float(value))
    if number is None or number < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def plate_name(value: Any, name: str = "data_plate") -> str:
    """``value`` as the name of a plate: a non-empty string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be the name of a pyro.plate (a string), got {value!r}")
    if not value:
        raise ValueError(f"{name} must be the name of a pyro.plate, got the empty string")
    return value


def finite_float(
    value: Any, name: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """``value`` as a finite float in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if minimum is not None and maximum is not None:
        expected = f"in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        expected = f"a finite number >= {minimum:g}"
    elif maximum is not None:
        expected = f"a finite number <= {maximum:g}"
    else:
        expected = "a finite number"
    too_low = minimum is not None and number < minimum
    too_high = maximum is not None and number > maximum
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


MAX_SEED = 2**32 - 1  # numpy's generators take seeds below 2**32


def seed_value(value: Any, name: str = "seed") -> int:
    """A seed every generator accepts: an integer in ``[0, 2**32 - 1]``."""
    seed = non_negative_int(value, name)
    if seed > MAX_SEED:
        raise ValueError(f"{name} must be at most {MAX_SEED} (numpy's limit), got {value!r}")
    return seed


# -- the data ---------------------------------------------------------------------------------


def as_data(data: Any, name: str) -> Data:
    """``data`` checked and, for NumPy arrays, converted: a tensor, a tuple of tensors (the
    pair's positional arguments, one first dimension) or a torch ``Dataset``.

    :raises TypeError: a list of row tensors, or anything else that is not data.
    :raises ValueError: empty data, tuple members of different lengths or devices, 0-d tensors,
        tensors on the meta device.
    """
    if isinstance(data, np.ndarray):
        data = _from_numpy(data, name)
    if isinstance(data, list):
        if data and all(isinstance(t, torch.Tensor | np.ndarray) for t in data):
            raise TypeError(
                f"{name} is a list of {len(data)} tensors; pass one tensor of rows "
                f"(torch.stack({name})) or a tuple of tensors (the pair's positional arguments)"
            )
        raise TypeError(
            f"{name} must be a tensor, a tuple of tensors or a torch Dataset, got a list"
        )
    if isinstance(data, tuple):
        data = tuple(_from_numpy(t, name) if isinstance(t, np.ndarray) else t for t in data)
        if not data or not all(isinstance(t, torch.Tensor) for t in data):
            kinds = sorted({type(t).__name__ for t in data})
            raise TypeError(f"{name} must be a tuple of tensors, got a tuple of {kinds}")
        if any(t.dim() == 0 for t in data):
            raise ValueError(f"{name} holds a 0-d tensor; every tensor needs a first (row) dim")
        lengths = [t.shape[0] for t in data]
        if len(set(lengths)) != 1:
            raise ValueError(f"{name}: the tensors of the tuple have different lengths {lengths}")
        devices = {str(t.device) for t in data}
        if len(devices) != 1:
            raise ValueError(f"{name}: the tensors of the tuple are on different devices {devices}")
    elif isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; it needs a first (row) dimension")
    elif not isinstance(data, torch.utils.data.Dataset):
        raise TypeError(
            f"{name} must be a tensor, a tuple of tensors or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    for tensor in _tensors(data):
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device: it has shapes but no values; create or load "
                "the data on a real device (cpu, cuda, mps)"
            )
    if _length(data) == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    return data


def _from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind == "f":
        return torch.as_tensor(array, dtype=torch.get_default_dtype())
    if array.dtype.kind in "biu":
        return torch.as_tensor(array)
    raise TypeError(f"{name} is a NumPy array of dtype {array.dtype}; expected numbers")


def _length(data: Data) -> int:
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, tuple):
        return data[0].shape[0]
    return len(data)


def _tensors(data: Data) -> tuple[torch.Tensor, ...]:
    """The data's tensors (none for a Dataset: it is not read in full)."""
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, tuple):
        return data
    return ()


def _where(flat_index: int, tensor: torch.Tensor, position: str) -> str:
    width = max(1, tensor[0].numel()) if tensor.dim() > 1 else 1
    row, column = divmod(flat_index, width)
    return f"row {row}" + (f", column {column}" if tensor.dim() > 1 else "") + position


def _position(i: int, count: int) -> str:
    return f" of tensor {i} of the tuple" if count > 1 else ""


def check_finite(data: Data, name: str, chunk_rows: int = 65_536) -> None:
    """Every floating value of the data's tensors is finite (chunks of rows, vectorised)."""
    tensors = _tensors(data)
    for i, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            continue
        for start in range(0, tensor.shape[0], chunk_rows):
            chunk = tensor[start : start + chunk_rows]
            finite = torch.isfinite(chunk)
            if bool(finite.all()):
                continue
            flat = int((~finite).reshape(-1).nonzero()[0]) + start * max(1, tensor[0].numel())
            value = float(tensor.reshape(-1)[flat])
            raise ValueError(
                f"{name} holds a non-finite value ({value}) at "
                f"{_where(flat, tensor, _position(i, len(tensors)))}; the data must be finite"
            )


def check_like(valid: Data, train: Data, name: str = "valid") -> None:
    """``valid``'s tensors have the rows' shapes, dtypes and devices of ``train``'s."""
    ours, theirs = _tensors(valid), _tensors(train)
    if not ours or not theirs:
        return
    if len(ours) != len(theirs):
        raise ValueError(f"{name} has {len(ours)} tensors, the training data {len(theirs)}")
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        where = _position(i, len(ours))
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"{name}{where} has rows of shape {tuple(a.shape[1:])}, the training data "
                f"{tuple(b.shape[1:])}"
            )
        if a.dtype != b.dtype:
            raise TypeError(f"{name}{where} has dtype {a.dtype}, the training data {b.dtype}")
        if a.device != b.device:
            raise ValueError(f"{name}{where} is on {a.device}, the training data on {b.device}")


# -- the data against the pair ----------------------------------------------------------------


def _probe_traces(model: Callable, guide: Callable, batch: tuple, name: str) -> tuple[Any, Any]:
    """The pair run once on ``batch`` (blocked, no gradients, random state kept, Pyro's
    validation off: the data's support is checked separately). Torch errors from inside the
    networks are reported as what they say about ``name``."""
    store = pyro.get_param_store()
    before = set(store.keys())
    try:
        return _run_probe(model, guide, batch, name)
    finally:  # the probe leaves Pyro's parameter store as it found it
        for new in set(store.keys()) - before:
            del store[new]


def _run_probe(model: Callable, guide: Callable, batch: tuple, name: str) -> tuple[Any, Any]:
    with (
        poutine.block(),
        torch.no_grad(),
        torch.random.fork_rng(devices=[]),
        pyro.validation_enabled(False),
    ):
        try:
            guide_trace = poutine.trace(guide).get_trace(*batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*batch)
        except (RuntimeError, TypeError, IndexError, ValueError) as error:
            raise _explain(error, batch, name) from error
    return model_trace, guide_trace


def _explain(error: Exception, batch: tuple, name: str) -> Exception:
    text = str(error).split("\nTrace Shapes")[0].strip().splitlines()
    first = text[0] if text else type(error).__name__
    low = first.lower()
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in batch if isinstance(t, torch.Tensor))
    expected = torch.get_default_dtype()
    if any(
        w in low
        for w in ("dtype", "scalar type", "expected both", "promotion", "not implemented for")
    ):
        return TypeError(
            f"{name} has dtype {', '.join(str(t.dtype) for t in batch)}; the model and guide "
            f"failed on it (expected {expected}, the networks' dtype: convert with .to("
            f"{expected})): {first}"
        )
    if "device" in low:
        return ValueError(
            f"{name} is on {', '.join(str(t.device) for t in batch)}, not on the device of the "
            f"model's parameters: {first}"
        )
    if any(w in low for w in ("shape", "size", "dimension", "index", "cannot be multiplied")):
        return ValueError(
            f"{name}: the model and guide failed on a batch of shape {shapes} (rows of "
            f"{name} must have the shape the pair expects): {first}"
        )
    return error


def _elementwise(support: Any) -> Any:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support if getattr(support, "event_dim", 0) == 0 else None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


def check_support(
    model_trace: Any, batch: tuple, data: Data, name: str, chunk_rows: int = 65_536
) -> None:
    """Every observed site's data lies in its distribution's support, on the whole dataset.

    An observed value that is (a view of) one of the batch's tensors is matched to that tensor
    of ``data`` and the support is checked there, elementwise, in chunks of rows; any other
    observed value is checked as it is in the probe batch.
    """
    full = _tensors(data)
    for site_name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = site["value"]
        support = getattr(site["fn"], "support", None)
        if not isinstance(value, torch.Tensor) or support is None:
            continue
        element = _elementwise(support)
        matched = [
            i
            for i, t in enumerate(batch)
            if isinstance(t, torch.Tensor)
            and t.numel() == value.numel()
            and _same_storage(t, value)
        ]
        if element is not None and matched and full:
            i = matched[0]
            tensor = full[i]
            where = f" (tensor {i} of the tuple)" if len(full) > 1 else ""
            try:
                for start in range(0, tensor.shape[0], chunk_rows):
                    ok = element.check(tensor[start : start + chunk_rows])
                    if bool(ok.all()):
                        continue
                    flat = int((~ok).reshape(-1).nonzero()[0]) + start * max(1, tensor[0].numel())
                    raise ValueError(
                        f"{name}{where} holds {float(tensor.reshape(-1)[flat])} at "
                        f"{_where(flat, tensor, '')}, outside the support ({element}) of the "
                        f"model's observed site {site_name!r} ({type(site['fn']).__name__})"
                    )
                continue
            except (RuntimeError, TypeError, NotImplementedError):
                pass  # a support with per-datapoint bounds: check the probe batch below
        try:
            ok = support.check(value)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if not bool(ok.all()):
            raise ValueError(
                f"{name} holds values outside the support ({support}) of the model's observed "
                f"site {site_name!r} ({type(site['fn']).__name__})"
            )


def check_pair_data(
    model: Callable,
    guide: Callable | None,
    data: Data,
    name: str,
    batch_size: int,
    get_batch: Callable[[Data, torch.Tensor], tuple],
    who: str = "fit",
    data_plate: str = "data",
) -> tuple[Any, Any]:
    """All data checks of ``data`` against the pair, once (see the module's docstring).

    ``batch_size`` rows (a real batch) are the probe, so that a pair whose data plate
    subsamples with ``subsample_size=batch_size`` runs as it will in training.
    ``guide=None``: a model alone, as a sampler runs it (every check but the guide's coverage).
    ``data_plate``: the name of the plate holding the datapoints.

    :returns: the probe's ``(model_trace, guide_trace)``, for further checks of the pair.
    """
    check_finite(data, name)
    n = _length(data)
    batch = get_batch(data, torch.arange(min(batch_size, n)))
    model_trace, guide_trace = _probe_traces(model, guide or _no_guide, batch, name)
    rows = batch[0].shape[0] if batch else 0
    check_data_plate(model_trace, guide_trace, rows, who, plate=data_plate)
    if guide is not None:
        check_guide_covers_model(model_trace, guide_trace, who)
    check_support(model_trace, batch, data, name)
    return model_trace, guide_trace


# -- time stamps of sequences -------------------------------------------------------------------


def check_times(times: Any, name: str = "times") -> torch.Tensor:
    """``times (..., T)``, a finite floating-point tensor strictly increasing along its last
    axis; returns the gaps ``(..., T-1)``.

    Every sequence model (and :mod:`pvae.gp`) calls this once per call on its time stamps:
    an unsorted or repeated stamp would otherwise give a zero or negative gap, which the
    models turn into a wrong number (a singular dense kernel, a transition over a negative
    time, a spline through two values at one knot) instead of an error. The message names
    ``name`` and the first offending position, e.g. ``times[0, 3] = 2 <= times[0, 2] = 2``.
    """
    if not isinstance(times, torch.Tensor) or not times.is_floating_point():
        what = times.dtype if isinstance(times, torch.Tensor) else type(times).__name__
        raise TypeError(f"{name} must be a floating-point tensor (..., T), got {what}")
    if times.dim() < 1:
        raise ValueError(f"{name} must have shape (..., T), got a scalar")
    finite = torch.isfinite(times)
    if not bool(finite.all()):
        index = _multi_index(int((~finite).flatten().nonzero()[0]), times.shape)
        raise ValueError(f"{name} must be finite; {name}{list(index)} = {float(times[index])}")
    gaps = times[..., 1:] - times[..., :-1]
    increasing = gaps > 0
    if not bool(increasing.all()):
        flat = int((~increasing).flatten().nonzero()[0])
        before = _multi_index(flat, increasing.shape)
        after = before[:-1] + (before[-1] + 1,)
        t_after, t_before = float(times[after]), float(times[before])
        kind = "a repeated stamp" if t_after == t_before else "stamps out of order"
        raise ValueError(
            f"{name} must increase strictly along the time axis (sorted, no repeats); "
            f"{name}{list(after)} = {t_after:g} <= {name}{list(before)} = {t_before:g} "
            f"({kind})"
        )
    return gaps


def _multi_index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    """The multi-index of position ``flat`` in a row-major tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def _no_guide(*args: Any, **kwargs: Any) -> None:
    """The empty guide of a model checked alone (a sampler's)."""
