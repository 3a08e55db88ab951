"""The discrete-time variational bound of the shipped digits VP model with DDPM's and Analytic-DPM's reverse variances,
beside its ODE likelihood, and the analytic variance's effect on few-step ancestral / DDIM sampling.

    python benchmarks/elbo.py                      # ~10 min on 2 busy CPU cores: 24 held-out digits, 128 samples
    python benchmarks/elbo.py --num 8 --samples 64 --ks 10 25 --sample-ks 10   # a smoke run

Bound: the VP SDE discretised to N = 1000 steps t_n = n/1000; K steps on Bao et al.'s even subsequence (n_1 = 1,
n_K = N). One x_n draw per digit and per step of the N-step chain (seeded per digit): every K and every variance
reuses the same network evaluations (N per digit). Two readings of the data:
  * "dequantized": the uniformly dequantized digits the model was trained on, Gaussian decoder (a density), bits/dim
    with the dequantization offset log2(17/2), exactly the ODE's convention: the two columns are comparable;
  * "discretized": the bin centres with Ho et al.'s discretized Gaussian decoder over the 17 bins (a probability).
The moment Gamma_n: M = 10 dequantized training digits per step at all N steps (10 N evaluations, cached with
`scoresolve.cached_moments`); the analytic variance uses the [-1, 1] data-range bound. Decoder variance: DDPM's
(beta-tilde_2, as Ho et al. and Bao et al.), and for "analytic*" the analytic one. "DP trajectory": the analytic
variance on the K-step subsequence chosen by `scoresolve.variational.optimal_steps` (Bao et al.'s dynamic programming).

Sampling: ancestral (reverse_diffusion) with beta, beta-tilde and the analytic variance, and DDIM (eta = 0) against
Analytic-DDIM (eta = 0 mean + analytic noise), on the same K-step subsequences ending at t = 1/N, then the data
prediction (the last step's mean); "last std clipped" caps the std of the last noisy step at one bin times
sqrt(pi/2) (Bao et al.'s clip for sampling, clip_pixel = 1). Error: the Frechet distance of pixel statistics (mean
and covariance of the 64 pixels) to the 1500 training digits, and the sliced Wasserstein distance to as many of
them; the floor is the same distances of as many held-out digits.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import scoresolve as ss
from scoresolve.compare import sliced_wasserstein
from scoresolve.data import DIGITS_LEVELS, digits
from scoresolve.models import load_digits_model
from scoresolve.quantization import dequantize, levels_offset
from scoresolve.variational import bound, chain_times, elbo_statistics, optimal_steps

PUBLISHED = """Published CIFAR-10 (Bao et al. 2022, Table 1; linear schedule, even steps; NLL bound, bits/dim):
| K | 10 | 25 | 50 | 100 | 200 | 400 | 1000 |
| --- | --- | --- | --- | --- | --- | --- | --- |
| DDPM beta-tilde | 74.95 | 24.98 | 12.01 | 7.08 | 5.03 | 4.29 | 3.73 |
| DDPM beta | 6.99 | 6.11 | 5.44 | 4.86 | 4.39 | 4.07 | 3.75 |
| Analytic-DDPM | 5.47 | 4.79 | 4.38 | 4.07 | 3.84 | 3.71 | 3.59 |"""


def _cell(b: torch.Tensor) -> str:
    return f"{float(b.mean()):.3f} +- {float(b.std() / math.sqrt(b.numel())):.3f}"


def frechet(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to the flattened rows of x and ref."""
    a, b = x.flatten(1).double(), ref.flatten(1).double()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ea, va = torch.linalg.eigh(ca)
    sa = va @ torch.diag(ea.clamp(min=0).sqrt()) @ va.T
    mid = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float((ma - mb).square().sum() + ca.trace() + cb.trace() - 2 * mid)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=24, help="held-out digits for the bounds and the ODE likelihood")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 25, 50, 100, 1000])
    p.add_argument("--moment-samples", type=int, default=10, help="M, data samples per step for Gamma_n")
    p.add_argument("--samples", type=int, default=128, help="samples per sampler for the sampling error")
    p.add_argument("--sample-ks", type=int, nargs="*", default=[10, 25])
    p.add_argument("--no-ode", action="store_true", help="skip the ODE likelihood")
    p.add_argument("--chain", type=int, default=1000, help="N, the steps of the discretised chain")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, sde = load_digits_model()
    N, L, rng = a.chain, DIGITS_LEVELS, (-1.0, 1.0)
    half = (rng[1] - rng[0]) / (2 * L)
    centres_range = (rng[0] + half, rng[1] - half)  # bin centres lo + (hi - lo)(v + 1/2)/L: a grid of L levels
    test = digits("test")[: a.num]
    x_deq = dequantize(test, DIGITS_LEVELS, generator=torch.Generator().manual_seed(1))
    v = torch.round((test + 1) * (L - 1) / 2)
    x_ctr = centres_range[0] + (centres_range[1] - centres_range[0]) * v / (L - 1)
    train = digits("train")
    times, _ = chain_times(sde, N, num_timesteps=N)

    t0 = time.perf_counter()
    train_deq = dequantize(train, DIGITS_LEVELS, generator=torch.Generator().manual_seed(2))
    mom = ss.cached_moments(model, sde, train_deq, times[1:], a.moment_samples, batch_size=1024)
    print(f"moments Gamma_n: M = {mom.num_samples} per step at {mom.t.numel()} steps = {mom.evaluations} network "
          f"evaluations ({mom.seconds:.0f} s when computed; this run {time.perf_counter() - t0:.0f} s); "
          f"median standard error {float(mom.std_error.median()):.2e}")

    t0 = time.perf_counter()
    stats = {"dequantized": elbo_statistics(model, sde, x_deq, N, num_timesteps=N, batch_size=1024),
             "discretized": elbo_statistics(model, sde, x_ctr, N, num_timesteps=N, batch_size=1024)}
    print(f"bound statistics: {N} evaluations per digit x {a.num} digits x 2 readings, "
          f"{time.perf_counter() - t0:.0f} s")

    ode = None
    if not a.no_ode:
        t0 = time.perf_counter()
        res = ss.log_likelihood(model, sde, x_deq, generator=torch.Generator().manual_seed(0))
        D = x_deq[0].numel()
        ode = -res.log_prob / (D * math.log(2)) + levels_offset(L, rng)
        print(f"ODE likelihood: mean NFE {float(res.nfe.float().mean()):.0f} per digit, "
              f"{time.perf_counter() - t0:.0f} s")

    dp: dict = {}
    cols = [("beta", "beta", "ddpm"), ("beta-tilde", "beta_tilde", "ddpm"), ("analytic", "analytic", "ddpm"),
            ("analytic*", "analytic", "analytic")]
    for reading, st in stats.items():
        kw = (dict(decoder="gaussian", num_levels=L, data_range=rng) if reading == "dequantized" else
              dict(decoder="discretized", num_levels=L, data_range=centres_range))
        print(f"\nDigits VP U-Net, {a.num} held-out digits, {reading} (bits/dim, mean +- standard error; "
              "analytic*: analytic decoder variance too)")
        head = "| K | " + " | ".join(c[0] for c in cols) + " | analytic, DP trajectory" + (
            " | ODE |" if ode is not None else " |")
        print(head)
        print("| --- " * (len(cols) + 2 + (ode is not None)) + "|")
        for K in a.ks:
            sub = st.subset(chain_times(sde, K, num_timesteps=N)[0])
            cells = []
            for _, variance, dec_var in cols:
                r = bound(sub, sde, variance, moments=mom, decoder_variance=dec_var, **kw)
                cells.append(_cell(r.bits_per_dim))
            if K not in dp:
                dp[K] = optimal_steps(sde, mom, K, num_timesteps=N, data_range=rng) if 2 <= K < N else None
            if dp[K] is not None:
                path = st.subset(torch.cat([torch.zeros(1, dtype=torch.float64), dp[K]]))
                cells.append(_cell(bound(path, sde, "analytic", moments=mom, **kw).bits_per_dim))
            else:
                cells.append(cells[2])
            extra = f" | {float(ode.mean()):.3f} +- {float(ode.std() / math.sqrt(ode.numel())):.3f} |" if (
                ode is not None and reading == "dequantized") else (" | |" if ode is not None else " |")
            print(f"| {K} | " + " | ".join(cells) + extra)
    above = (mom.gamma > 1).nonzero().flatten()
    print(f"\nDP trajectories (n_k; the first Monte Carlo Gamma_n > 1 is at n = "
          f"{int(above[0]) + 1 if above.numel() else 'none'}: from twice as far below N the chain is spaced evenly, "
          "Bao et al.'s rule):")
    for K, path in dp.items():
        if path is not None:
            print(f"  K = {K}: {(path * N).round().long().tolist()}")
    print("\n" + PUBLISHED)

    if a.sample_ks:
        sampling_table(model, sde, mom, train, a.samples, a.sample_ks, N, L)


def sampling_table(model, sde, mom, train, n, ks, N, L) -> None:
    held = dequantize(digits("test")[:n], DIGITS_LEVELS, generator=torch.Generator().manual_seed(3))
    train_deq = dequantize(train, DIGITS_LEVELS, generator=torch.Generator().manual_seed(4))
    sub = train_deq[torch.randperm(train_deq.shape[0], generator=torch.Generator().manual_seed(6))[:n]]
    floor_fd, floor_sw = frechet(held, train_deq), sliced_wasserstein(held, sub)
    print(f"\nFew-step sampling, {n} samples (same x_T and noise seeds everywhere), distance to the 1500 training "
          f"digits: pixel Frechet distance / sliced Wasserstein; floor ({n} held-out digits) {floor_fd:.3f} / "
          f"{floor_sw:.4f}")
    analytic = {"variance": "analytic", "moments": mom, "data_range": (-1, 1)}
    clip = 2 / L * math.sqrt(math.pi / 2)  # Bao et al.'s last-step clip, one bin: clip_pixel (2/255) sqrt(pi/2)
    runs = [("ancestral, beta", "reverse_diffusion", {"variance": "beta"}),
            ("ancestral, beta-tilde", "reverse_diffusion", {"variance": "beta_tilde"}),
            ("Analytic-DDPM", "reverse_diffusion", analytic),
            ("Analytic-DDPM, last std clipped", "reverse_diffusion", {**analytic, "last_std": clip}),
            ("DDIM (eta = 0)", "ddim", {"eta": 0.0}),
            ("Analytic-DDIM (eta = 0)", "ddim", {"eta": 0.0, **analytic}),
            ("Analytic-DDIM (eta = 0), last std clipped", "ddim", {"eta": 0.0, **analytic, "last_std": clip})]
    x_T = sde.prior_sample((n, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    seeds = torch.arange(n)
    print("| sampler | " + " | ".join(f"K = {K}" for K in ks) + " |")
    print("| --- " * (len(ks) + 1) + "|")
    for label, solver, opts in runs:
        cells = []
        for K in ks:
            grid = chain_times(sde, K, num_timesteps=N)[0][1:].flip(0)
            with torch.no_grad():
                x = ss.sample(model, sde, x_T, solver=solver, grid=grid, denoise=True, seeds=seeds, **opts).x
            x = x.clamp(-1, 1)
            cells.append(f"{frechet(x, train_deq):.3f} / {sliced_wasserstein(x, sub):.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
