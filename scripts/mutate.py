"""Mutation check: does the suite catch plausible bugs in the estimators, the scaling, the
resume path, the fusion and the state-space code?

Each mutation replaces one exact snippet of one source file by a plausible wrong version,
runs the tests that should notice, and restores the file. A mutant is *caught* when those
tests fail. Mutants are applied in place, in the checkout the package imports from (an
editable install maps ``pvae.models`` and ``pvae.inference`` to this checkout, so a copy
elsewhere would test the original code). The original bytes are kept in a backup file next to
the mutated one and restored on exit, on Ctrl-C, and by the next run if a run was killed.

    python scripts/mutate.py            # all mutants, prints caught/total
    python scripts/mutate.py --list     # the mutants and the tests each runs
    python scripts/mutate.py -k free    # only mutants whose name contains "free"

The selected tests are first run once on the unmutated code (a test that already fails would
count every mutant as caught). Exit status 0 when every mutant is caught, 1 otherwise (2 on a
stale or missing snippet, or when the tests fail without any mutant).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKUP = ".mutate-backup"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths, relative to the root


ELBO_TESTS = "tests/inference/test_elbo.py"
IMPORTANCE = "tests/inference/test_importance.py"
EVALUATE = "tests/core/test_evaluate.py"
SSM = "tests/core/test_ssm.py"
MULTIMODAL = "tests/models/test_multimodal.py"
TRAIN_RESUME = "tests/core/test_train.py::test_resume_restores_the_annealing_step"
BRANCHES = "tests/models/test_branches.py::"
CLI_RESUME = "tests/cli/test_cli.py::test_resume_continues_the_run"

# The mutants, grouped by what they break. Each snippet is small and exact so that edits
# elsewhere in the file leave it valid; ``--list`` checks that every one still occurs once.
MUTATIONS: list[Mutation] = [
    # -- scaling: the data plate's N/B factor ----------------------------------------------
    Mutation(
        "reducer-keeps-plate-scale",  # N/B applied twice to per-datapoint terms (masked sites)
        "pvae/protocol.py",
        "scale = scale / self.data_scale",
        "scale = scale",
        ("tests/core/test_protocol.py::test_masked_sites_scale_by_n_over_b_once",),
    ),
    Mutation(
        "reducer-fast-path-keeps-plate-scale",  # the same in the common sites' fast path
        "pvae/protocol.py",
        "return value.reshape(shape[0] if len(shape) == 2 else 1, shape[-1], -1)",
        "return scale * value.reshape(shape[0] if len(shape) == 2 else 1, shape[-1], -1)",
        (ELBO_TESTS + "::test_minibatch_scaling_counts_global_terms_once", IMPORTANCE),
    ),
    Mutation(
        "scale-to-data-does-not-scale",
        "pvae/protocol.py",
        'msg["scale"] = msg["scale"] * (self.num_data / size)',
        'msg["scale"] = msg["scale"]',
        (ELBO_TESTS + "::test_minibatch_scaling_counts_global_terms_once", IMPORTANCE),
    ),
    Mutation(
        "unsized-plate-unscaled",  # an unsized plate taken as the whole data set
        "pvae/protocol.py",
        "size = site_batch_size(msg, frame)",
        "size = self.num_data",
        ("tests/core/test_protocol.py",),
    ),
    # -- the ELBO --------------------------------------------------------------------------
    Mutation(
        "free-bits-scaled-twice",
        "inference/elbo.py",
        "scale * batch * per_dim if local",
        "scale * scale * batch * per_dim if local",
        (ELBO_TESTS,),
    ),
    Mutation(
        "free-bits-clamped-per-datapoint",
        "inference/elbo.py",
        "term.mean(0).mean(0).clamp(min=self.free_bits)",
        "term.mean(0).clamp(min=self.free_bits).mean(0)",
        (ELBO_TESTS,),
    ),
    Mutation(
        "analytic-kl-reversed",  # KL(p || q) instead of KL(q || p)
        "pvae/kl.py",
        "return kl_divergence(q_base, p_base), event_dims",
        "return kl_divergence(p_base, q_base), event_dims",
        (ELBO_TESTS,),
    ),
    Mutation(
        "elbo-stl-not-detached",
        "inference/elbo.py",
        'q, p = detach_distribution(guide_site["fn"]), model_site["fn"]',
        'q, p = guide_site["fn"], model_site["fn"]',
        (ELBO_TESTS,),
    ),
    # -- importance-weighted bounds ---------------------------------------------------------
    Mutation(
        "log-mean-exp-without-log-k",
        "pvae/protocol.py",
        "return torch.logsumexp(value, dim) - math.log(value.shape[dim])",
        "return torch.logsumexp(value, dim)",
        (IMPORTANCE,),
    ),
    Mutation(
        "miwae-wrong-axis",
        "inference/importance.py",
        "per_datapoint = log_mean_exp(local, dim=1).mean(0)  # (B,)",
        "per_datapoint = log_mean_exp(local, dim=0).mean(0)  # (B,)",
        (IMPORTANCE,),
    ),
    Mutation(
        "piwae-guide-gets-iwae",
        "inference/importance.py",
        'return [(self.num_inner if self.encoder_objective == "miwae" else 1, 1.0)]',
        "return [(self.num_particles, 1.0)]",
        (IMPORTANCE,),
    ),
    Mutation(
        "dreg-weights-not-squared",
        "inference/importance.py",
        "(normalised**2 * local)",
        "(normalised * local)",
        (IMPORTANCE,),
    ),
    Mutation(
        "stl-not-detaching",
        "inference/importance.py",
        'detach_guide=self.estimator != "reparam"',
        "detach_guide=False",
        (IMPORTANCE,),
    ),
    Mutation(
        "ciwae-beta-swapped",
        "inference/importance.py",
        "return [(1, self.beta), (self.num_inner, 1.0 - self.beta)]",
        "return [(1, 1.0 - self.beta), (self.num_inner, self.beta)]",
        (IMPORTANCE,),
    ),
    # -- evaluation -------------------------------------------------------------------------
    Mutation(
        "log-likelihood-averages-chunks",
        "pvae/evaluate.py",
        "total = chunk if total is None else torch.logaddexp(total, chunk)",
        "chunk = (chunk - math.log(k)) * (k / num_samples) + math.log(num_samples) * k "
        "/ num_samples\n                total = chunk if total is None else total + chunk",
        (EVALUATE,),
    ),
    # -- the resume path ---------------------------------------------------------------------
    Mutation(
        "engine-state-not-restored",
        "pvae/train.py",
        'load_engine_state(self.engine, state.get("engine", {}))',
        "reset_engine(self.engine)",
        (TRAIN_RESUME, CLI_RESUME),
    ),
    Mutation(
        "rng-state-not-restored",
        "pvae/train.py",
        'set_rng_state(state["rng"])',
        "pass",
        (CLI_RESUME,),
    ),
    # -- fusion and ownership -----------------------------------------------------------------
    Mutation(
        "poe-returns-precision-root",  # the product's precision mistaken for its variance
        "pvae/gaussian.py",
        "return weighted / total, total.rsqrt()",
        "return weighted / total, total.sqrt()",
        ("tests/core/test_gaussian.py",),
    ),
    Mutation(
        "poe-prior-expert-ignored",
        "pvae/gaussian.py",
        "total = total + prior_precision",
        "total = total + 0 * prior_precision",
        ("tests/core/test_gaussian.py",),
    ),
    Mutation(
        "moe-not-stratified",  # every replicate drawn from the same component
        "models/multimodal.py",
        'rank = torch.div(r * count, num_replicates, rounding_mode="floor") + offset',
        'rank = torch.div(r, num_replicates, rounding_mode="floor") + offset',
        (MULTIMODAL + "::test_stratified_draws_fill_equal_contiguous_blocks_of_valid_components",),
    ),
    Mutation(
        "ownership-shared-goes-to-guide",
        "pvae/protocol.py",
        "and name not in model_uses",
        "",
        ("tests/core/test_protocol.py",),
    ),
    # -- state-space models -------------------------------------------------------------------
    Mutation(
        "ssm-initial-cov-one-step-early",  # Pyro's convention: x_1 = A x_0 + q
        "pvae/ssm.py",
        "        if t:\n            P = _sym_add(A[t - 1] @ P @ At[t - 1], Q[t - 1])",
        "        if True:\n            P = _sym_add(A[t - 1] @ P @ At[t - 1], Q[t - 1])",
        (SSM,),
    ),
    Mutation(
        "ssm-transition-transposed",
        "pvae/ssm.py",
        "P = _sym_add(A[t - 1] @ P @ At[t - 1], Q[t - 1])",
        "P = _sym_add(At[t - 1] @ P @ A[t - 1], Q[t - 1])",
        (SSM,),
    ),
    Mutation(
        "ssm-missing-step-contributes",
        "pvae/ssm.py",
        "terms = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))",
        "terms = terms",
        (SSM,),
    ),
    # --- the sequence and sampler families -------------------------------------------------
    Mutation(
        "matern32-stationary-cov",  # the derivative's stationary variance off by a factor lambda
        "pvae/gp.py",
        "P_rows = [[variance, zero], [zero, lam**2 * variance]]",
        "P_rows = [[variance, zero], [zero, lam * variance]]",
        ("tests/core/test_gp_ssm.py",),
    ),
    Mutation(
        "koopman-operator-transposed",  # z_{t+1} = A^T z_t instead of z_{t+1} = z_t A
        "models/koopman.py",
        "return torch.linalg.pinv(past) @ future",
        "return (torch.linalg.pinv(past) @ future).mT",
        ("tests/models/test_koopman.py::test_least_squares_recovers_a_planted_operator",),
    ),
    Mutation(
        "gpvae-banded-kl-log-det",  # the prior's log-determinant halved
        "models/gp_vae.py",
        "log_det_prior = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)",
        "log_det_prior = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)",
        ("tests/models/test_gp_vae.py::test_banded_kl_to_gp_prior_equals_dense",),
    ),
    Mutation(
        "poisson-closed-form-variance",  # E[exp(eta)] without the sigma^2 / 2
        "models/multimodal_gp.py",
        "torch.exp(mean + 0.5 * variance)",
        "torch.exp(mean)",
        ("tests/models/test_multimodal_gp.py::test_poisson_closed_form_matches_monte_carlo",),
    ),
    Mutation(
        "sghmc-data-scaled-twice",  # the N/B scale applied twice in the potential
        "inference/sghmc.py",
        'scale_and_mask(log_prob, msg["scale"], msg["mask"])',
        'scale_and_mask(log_prob, msg["scale"] * msg["scale"], msg["mask"])',
        ("tests/inference/test_sghmc.py::test_regression_scales_data_once",),
    ),
    Mutation(
        "sghmc-step-not-per-datapoint",  # the plain sampler's step lr instead of lr / N
        "inference/sghmc.py",
        "eta = self.lr / self.num_data",
        "eta = self.lr",
        ("tests/inference/test_sghmc_defaults.py::test_plain_sghmc_full_batch_regime",),
    ),
    # -- bookkeeping: what the loops and generators record (tests compare it by hand) ------
    Mutation(
        "epoch-bound-batches-weighted-equally",  # a short last batch counts as a full one
        "pvae/train.py",
        "epoch_bound += bound / n_train * len(index)",
        "epoch_bound += bound / self.steps_per_epoch",
        ("tests/core/test_train_bookkeeping.py",),
    ),
    Mutation(
        "same-minibatch-order-every-epoch",  # the order no longer depends on the epoch
        "pvae/train.py",
        "manual_seed(self.seed + epoch))",
        "manual_seed(self.seed))",
        ("tests/core/test_train_bookkeeping.py",),
    ),
    Mutation(
        "encoder-steps-train-the-decoder",  # the aggressive phase's guide steps move the model
        "pvae/train.py",
        "        for p in model_params:\n            p.grad = None\n"
        "        ddp.average_grads(guide_params)",
        "        ddp.average_grads(guide_params)",
        ("tests/core/test_train_bookkeeping.py",),
    ),
    Mutation(
        "yardstick-ignores-its-k",  # every yardstick is IWAE-64 whatever was asked
        "pvae/app/compare.py",
        'engine = IWAE(samples) if name == "iwae" else ELBO(samples)',
        'engine = IWAE(64) if name == "iwae" else ELBO(samples)',
        ("tests/cli/test_compare_stats.py",),
    ),
    Mutation(
        "lds-generated-with-transposed-a",  # the data follow A^T while info records A
        "pvae/data/sequences.py",
        "states[:, t] = states[:, t - 1] @ A.T + step_noise",
        "states[:, t] = states[:, t - 1] @ A + step_noise",
        ("tests/data/test_lds.py::test_recorded_parameters_generate_the_data",),
    ),
    Mutation(
        "kalman-prediction-not-symmetrised",  # drifts at D >= 3, T ~ 1e3 in float32
        "pvae/ssm.py",
        "P = _sym_add(A[t - 1] @ P @ At[t - 1], Q[t - 1])",
        "P = A[t - 1] @ P @ At[t - 1] + Q[t - 1]",
        ("tests/core/test_ssm.py::test_long_sequences_keep_covariances_symmetric_and_positive",),
    ),
    Mutation(
        "resume-forgets-python-random",  # a model drawing from Python's random diverges
        "pvae/checkpoint.py",
        '    random.setstate((3, tuple(state["python"]), state["python_gauss"]))\n',
        "",
        ("tests/core/test_sample_bookkeeping.py",),
    ),
    # -- branches only non-default options take (tests/models/test_branches.py) ------------
    Mutation(
        "kalman-particle-loop-sums",  # the particle loop adds the particles' bounds
        "inference/kalman.py",
        "bound = bound + value / len(draws)",
        "bound = bound + value",
        (BRANCHES + "test_kalman_elbo_particle_loop_averages_the_particles",),
    ),
    Mutation(
        "kalman-filter-first-transition-only",  # per-step A_t read as A_1 at every step
        "pvae/ssm.py",
        "P = _sym_add(A[t - 1] @ P @ At[t - 1], Q[t - 1])",
        "P = _sym_add(A[0] @ P @ At[0], Q[t - 1])",
        (BRANCHES + "test_particle_loop_on_per_step_transitions_equals_the_dense_log_likelihood",),
    ),
    Mutation(
        "log-likelihood-normalises-by-last-chunk",  # log K of the last run, not of all samples
        "pvae/evaluate.py",
        "results.append(total - math.log(num_samples))",
        "results.append(total - math.log(k))",
        (BRANCHES + "test_log_likelihood_particle_loop_on_a_sequence_pair_is_exact",),
    ),
    Mutation(
        "fixed-gaussian-scale-as-variance",  # a fixed scale s used as s^2 (sqrt of it as s)
        "pvae/likelihoods.py",
        "return self._fixed_scale",
        "return self._fixed_scale.sqrt()",
        (
            BRANCHES + "test_structured_linear_gaussian_scale_learned_and_fixed",
            BRANCHES + "test_structured_neural_decoder_fixed_scale_is_scored_with_it",
        ),
    ),
    Mutation(
        "learned-gaussian-scale-as-variance",  # exp(log_scale) taken as the variance
        "pvae/likelihoods.py",
        "return self.log_scale.exp()",
        "return self.log_scale.exp().sqrt()",
        (BRANCHES + "test_structured_linear_gaussian_scale_learned_and_fixed",),
    ),
    Mutation(
        "markovian-gp-decoder-reads-derivatives",  # the decoder reads the wrong slice
        "models/markovian_gp.py",
        "f = z[..., : self.z_dim]",
        "f = z[..., -self.z_dim :]",
        (BRANCHES + "test_markovian_gp_decoder_and_encode_read_the_gp_values",),
    ),
    Mutation(
        "markovian-gp-encode-reads-derivatives",
        "models/markovian_gp.py",
        "return q.mean[..., : self.z_dim], q.variance[..., : self.z_dim]",
        "return q.mean[..., -self.z_dim :], q.variance[..., : self.z_dim]",
        (BRANCHES + "test_markovian_gp_decoder_and_encode_read_the_gp_values",),
    ),
    Mutation(
        "forecast-every-step-one-ahead",  # horizon k rolled one step instead of k
        "models/structured.py",
        "            state = state @ A.mT\n            states.append(state)\n",
        "            states.append(state @ A.mT)\n",
        (BRANCHES + "test_structured_forecast_k_steps_is_the_exact_kalman_prediction",),
    ),
    Mutation(
        "markovian-gp-impute-encodes-hidden-frames",  # hidden frames taken as observations
        "models/markovian_gp.py",
        "mean = self.decode(self.encode(values, times, mask)[0])",
        "mean = self.decode(self.encode(values, times)[0])",
        (BRANCHES + "test_markovian_gp_imputes_a_trailing_gap_of_three_frames_exactly",),
    ),
    Mutation(
        "koopman-horizon-loss-not-averaged",  # summed over h = 1..H instead of averaged
        "models/koopman.py",
        "return total / max(horizon, 1)",
        "return total",
        (
            BRANCHES
            + "test_koopman_predictive_loss_at_horizon_three_is_the_mean_of_the_h_step_errors",
        ),
    ),
    Mutation(
        "koopman-horizon-power-not-raised",  # every horizon compares with one step of A
        "models/koopman.py",
        "power = power @ A",
        "power = A",
        (
            BRANCHES
            + "test_koopman_predictive_loss_at_horizon_three_is_the_mean_of_the_h_step_errors",
        ),
    ),
    Mutation(
        "ou-prior-step-variance-1-minus-a",  # Q = 1 - a instead of 1 - a^2: not stationary
        "models/multimodal_gp.py",
        "torch.diag_embed(1 - decay**2)",
        "torch.diag_embed(1 - decay)",
        (BRANCHES + "test_markovian_prior_log_prob_posterior_and_kl_equal_the_dense_ou_gp",),
    ),
    Mutation(
        "ou-posterior-precision-as-covariance",  # potentials' precision used as covariance
        "models/multimodal_gp.py",
        "precision.clamp_min(_NO_PRECISION).reciprocal()",
        "precision.clamp_min(_NO_PRECISION)",
        (BRANCHES + "test_markovian_prior_log_prob_posterior_and_kl_equal_the_dense_ou_gp",),
    ),
]


def _restore_stale() -> None:
    for backup in ROOT.rglob(f"*{BACKUP}"):
        if ".venv" in backup.parts:
            continue
        target = backup.with_name(backup.name[: -len(BACKUP)])
        os.replace(backup, target)
        print(f"restored {target.relative_to(ROOT)} from a killed run", file=sys.stderr)


def _check(mutation: Mutation) -> str:
    text = (ROOT / mutation.path).read_text()
    count = text.count(mutation.old)
    if count != 1:
        return f"{mutation.name}: snippet found {count} times in {mutation.path} (expected once)"
    return ""


def _run(mutation: Mutation, python: str, timeout: float) -> tuple[bool, float, str]:
    path = ROOT / mutation.path
    backup = path.with_name(path.name + BACKUP)
    original = path.read_bytes()
    backup.write_bytes(original)
    start = time.perf_counter()
    try:
        path.write_text(original.decode().replace(mutation.old, mutation.new, 1))
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return True, time.perf_counter() - start, "timed out (counted as caught)"
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode == 5:
            raise SystemExit(f"{mutation.name}: the tests {mutation.tests} collected nothing")
        return proc.returncode != 0, time.perf_counter() - start, tail
    finally:
        path.write_bytes(original)
        backup.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k",
        action="append",
        default=[],
        help="only mutants whose name contains this (repeat for several)",
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="do not first check that the selected tests pass on the unmutated code",
    )
    args = parser.parse_args(argv)
    _restore_stale()
    chosen = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    if not chosen:
        print(f"no mutant's name contains any of {args.k}", file=sys.stderr)
        return 2
    stale = [problem for m in chosen if (problem := _check(m))]
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    if not args.skip_baseline:
        # Tests that already fail would count every mutant as caught: they must pass first.
        tests = sorted({test for m in chosen for test in m.tests})
        cmd = [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
            print("the tests fail without any mutant:", *failed[:20], sep="\n", file=sys.stderr)
            return 2
        print(f"baseline: {(proc.stdout.strip().splitlines() or [''])[-1]}")
    caught = 0
    for m in chosen:
        killed, seconds, tail = _run(m, args.python, args.timeout)
        caught += killed
        print(f"{'caught ' if killed else 'MISSED '} {m.name:40s} {seconds:6.1f} s  {tail}")
        sys.stdout.flush()
    print(f"\nmutation score: {caught}/{len(chosen)} caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
