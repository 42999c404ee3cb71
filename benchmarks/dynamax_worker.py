"""The dynamax side of ``kalman_scaling.py``, alone in a jax-only process (no torch imported).

In a process that has imported torch, jax's compilation of dynamax's parallel smoother at
T = 10^4 stops with every thread asleep; alone it compiles in seconds. So the benchmark starts
this script as a child process and talks to it in JSON lines (one request on stdin, one reply on
stdout). On start it replies ``{"ready": true, "jax": version, "dynamax": version}``, or
``{"error": message}`` when jax or dynamax cannot be imported. Requests:

- ``{"op": "load", "npz": path, "method": "sequential" | "parallel", "grad": bool}``: read
  the model from the ``.npz`` (the six arrays of ``KEYS`` and ``y``: ``(T, M)`` or
  ``(B, T, M)``, batched with ``vmap`` over one shared model), jit the smoother (all smoothed
  moments and log Z) or the gradient of the filter's log Z with respect to the six arrays,
  run it once (compilation, timed on the wall clock) and once more (warm-up). Reply
  ``{"compile_s": s, "log_z": [...]}``.
  The function stays loaded under its method until the next load of that method.
- ``{"op": "time", "method": method, "k": k}``: call that method's loaded function k times,
  each timed with this process's CPU clock; reply ``{"times": [seconds, ...]}``.
- ``{"op": "check", "npz": path, "method": ..., "boost": float}``: the smoother's log Z,
  smoothed means and smoothed covariances on that input, compiled apart with dynamax's
  ``psd_solve`` adding ``boost`` to the diagonal (dynamax's default is 1e-9; 0 computes the
  same quantities as pvae exactly). Reply ``{"log_z": [...], "smoothed_means": [...],
  "smoothed_covariances": [...]}`` (nested lists).
- ``{"op": "quit"}``: exit.

XLA runs on one CPU thread in float64.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

KEYS = (
    "transition_matrix",
    "transition_cov",
    "observation_matrix",
    "observation_cov",
    "initial_loc",
    "initial_cov",
)


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Peer:
    """dynamax's jitted smoother or filter gradient on one model at a time."""

    def __init__(self) -> None:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        import dynamax
        import jax
        from dynamax.linear_gaussian_ssm import inference, parallel_inference
        from dynamax.utils import utils

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_platforms", "cpu")
        self.jax, self.inference, self.parallel, self.utils = (
            jax,
            inference,
            parallel_inference,
            utils,
        )
        self.versions = {"jax": jax.__version__, "dynamax": getattr(dynamax, "__version__", "?")}
        self.jitted: dict[tuple[str, bool, bool], tuple[Callable, Callable]] = {}
        self.calls: dict[str, Callable[[], Any]] = {}

    def arrays(self, path: str) -> tuple[tuple[Any, ...], Any]:
        import numpy as np

        jnp = self.jax.numpy
        with np.load(path) as data:
            theta = tuple(jnp.asarray(data[k]) for k in KEYS)
            y = jnp.asarray(data["y"])
        return theta, y

    def functions(self, method: str, grad: bool, batched: bool) -> tuple[Callable, Callable]:
        """(timed function, log Z) jitted once per (method, gradient, batched)."""
        key = (method, grad, batched)
        if key not in self.jitted:
            jax, inference = self.jax, self.inference
            module = self.parallel if method == "parallel" else inference

            def params(theta):
                A, Q, H, R, m1, P1 = theta
                return inference.make_lgssm_params(m1, P1, A, Q, H, R)

            def smooth(theta, y):
                post = module.lgssm_smoother(params(theta), y)
                return post.marginal_loglik, post.smoothed_means, post.smoothed_covariances

            def log_z(theta, y):
                return module.lgssm_filter(params(theta), y).marginal_loglik

            def batch(fn):
                return jax.vmap(fn, in_axes=(None, 0)) if batched else fn

            timed = jax.jit(batch(jax.grad(log_z) if grad else smooth))
            self.jitted[key] = (timed, jax.jit(batch(log_z)))
        return self.jitted[key]

    def load(self, npz: str, method: str, grad: bool) -> dict[str, Any]:
        theta, y = self.arrays(npz)
        timed, value = self.functions(method, grad, y.ndim == 3)
        block = self.jax.block_until_ready

        def call() -> None:
            block(timed(theta, y))

        start = time.perf_counter()
        call()
        compile_s = time.perf_counter() - start
        call()
        self.calls[method] = call
        log_z = self.jax.device_get(value(theta, y))
        return {"compile_s": compile_s, "log_z": log_z.reshape(-1).tolist()}

    def time(self, method: str, k: int) -> dict[str, Any]:
        if method not in self.calls:
            raise ValueError(f"time of {method!r} before its 'load' request")
        call = self.calls[method]
        times = []
        for _ in range(k):
            start = time.process_time()
            call()
            times.append(time.process_time() - start)
        return {"times": times}

    def check(self, npz: str, method: str, boost: float) -> dict[str, Any]:
        """The smoother's outputs with ``psd_solve``'s diagonal boost set to ``boost``."""
        theta, y = self.arrays(npz)
        psd_solve = self.utils.psd_solve
        default = psd_solve.__defaults__
        psd_solve.__defaults__ = (boost,)
        try:
            module = self.parallel if method == "parallel" else self.inference
            A, Q, H, R, m1, P1 = theta
            params = self.inference.make_lgssm_params(m1, P1, A, Q, H, R)
            # a fresh closure, so that jax traces it with the boost set here
            post = self.jax.jit(lambda p, obs: module.lgssm_smoother(p, obs))(params, y)
            out = self.jax.device_get(
                (post.marginal_loglik, post.smoothed_means, post.smoothed_covariances)
            )
        finally:
            psd_solve.__defaults__ = default
        return {
            "log_z": out[0].reshape(-1).tolist(),
            "smoothed_means": out[1].tolist(),
            "smoothed_covariances": out[2].tolist(),
        }


def main() -> None:
    try:
        peer = Peer()
    except ImportError as error:
        reply({"error": f"jax/dynamax not importable in {sys.executable}: {error}"})
        return
    reply({"ready": True, **peer.versions})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "quit":
                return
            if op == "load":
                reply(peer.load(request["npz"], request["method"], bool(request["grad"])))
            elif op == "time":
                reply(peer.time(request["method"], int(request["k"])))
            elif op == "check":
                reply(peer.check(request["npz"], request["method"], float(request["boost"])))
            else:
                reply({"error": f"unknown op {op!r}: expected load, time, check or quit"})
        except Exception as error:  # reported to the parent, which stops
            reply({"error": f"{type(error).__name__}: {error}"})


if __name__ == "__main__":
    main()
