"""GPU benchmark: PF-ODE log-likelihood of a diffusers UNet2DModel (DDPM CIFAR-10 configuration, random weights).

Batch 64 of 3x32x32, rtol = atol = 1e-5, float32, VP SDE, Hutchinson with one Rademacher probe (the same probe for
every method). Columns: NFE, wall seconds, seconds per NFE, ratio to the floor (one forward + one VJP measured in
this run), log p mean and its difference to baseline (b). Baselines in the same run:
  (a) score_sde's algorithm: scipy solve_ivp RK45 on the host, drift and divergence by separate network calls;
  (b) torchdiffeq dopri5 on the device, fused forward + VJP (k-diffusion's algorithm).
Then scoresolve's log_likelihood, plain and with the opt-in speed-ups: batch compaction (``compact=True``) and the
network speed-ups of scoresolve.speedups (tf32, channels_last, bf16 autocast, torch.compile, CUDA graphs through
torch.compile's "reduce-overhead" mode), and two runs at (b)'s tolerance semantics: ``shampine`` (torchdiffeq's
dopri5 error weights, 2/3 of Hairer's) and ``as_b`` (those weights and its I controller too: what is left is the
per-sample control and the cost per call). A run with 4 probes at a loose tolerance gives the Hutchinson standard
error that the log p differences are compared with. Rows run in ORDER and those that would pass ``--deadline`` are
skipped; ``--json`` is rewritten after every row. "rows" is the work: single-sample network
evaluations (calls x batch without compaction).

    python benchmarks/likelihood_gpu.py [--batch 64] [--skip-scipy] [--tiny] [--json out.json]
    (--tiny: a small UNet, for a CPU smoke run)
Needs diffusers (pip install diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import scoresolve as ss
from scoresolve.divergence import draw_probes, hutchinson_div_score
from scoresolve.solvers import PIController
from scoresolve.speedups import accelerate


def make_unet(tiny: bool) -> torch.nn.Module:
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    # google/ddpm-cifar10-32: 35.7M parameters
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def eps_net(unet):
    def net(x, t):  # DDPM-style timestep input: t * 999
        return unet(x, t * 999).sample

    return net


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_ms(model, x, eps, device, reps=10) -> float:
    t = torch.full((x.shape[0],), 0.5, device=device)
    for _ in range(3):
        hutchinson_div_score(model, x, t, eps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        hutchinson_div_score(model, x, t, eps)
    sync(device)
    return (time.perf_counter() - t0) / reps


def scipy_baseline(model, sde, x, eps, t_eps, tol):
    """score_sde's likelihood: RK45 on the host, one call for the drift and another (forward + VJP) for div."""
    from scipy.integrate import solve_ivp

    shape, device, D = x.shape, x.device, x[0].numel()
    B = shape[0]
    nfe = {"n": 0}

    def f(t, y):
        nfe["n"] += 1
        xt = torch.from_numpy(y[: -B].astype(np.float32)).reshape(shape).to(device)
        tb = torch.full((B,), t, device=device)
        fcoef, g2 = sde.f(tb, check=False), sde.g2(tb, check=False)  # scipy and torchdiffeq step past T
        with torch.no_grad():
            s = model(xt, tb)  # drift: one forward
        v = fcoef.view(-1, 1, 1, 1) * xt - (0.5 * g2).view(-1, 1, 1, 1) * s
        _, ds = hutchinson_div_score(model, xt, tb, eps)  # divergence: a second forward + VJP
        div = D * fcoef - 0.5 * g2 * ds[:, 0]
        return np.concatenate([v.flatten().cpu().numpy(), div.cpu().numpy()]).astype(np.float64)

    y0 = np.concatenate([x.flatten().cpu().numpy(), np.zeros(B)])
    t0 = time.perf_counter()
    sol = solve_ivp(f, (t_eps, sde.T), y0, rtol=tol, atol=tol, method="RK45")
    sec = time.perf_counter() - t0
    z = torch.from_numpy(sol.y[: -B, -1]).reshape(shape).float()
    delta = torch.from_numpy(sol.y[-B:, -1]).float()
    return sde.prior_log_prob(z) + delta, nfe["n"], sec


def torchdiffeq_baseline(model, sde, x, eps, t_eps, tol):
    from torchdiffeq import odeint

    D = x[0].numel()
    nfe = {"n": 0}
    sde_ext = sde  # VP's schedule extends past T, where torchdiffeq's last step may land

    def func(t, state):
        xt, _ = state
        nfe["n"] += 1
        tb = t.expand(xt.shape[0])
        s, ds = hutchinson_div_score(model, xt, tb, eps)
        f, g2 = sde_ext.f(tb, check=False), sde_ext.g2(tb, check=False)  # see above
        return f.view(-1, 1, 1, 1) * xt - (0.5 * g2).view(-1, 1, 1, 1) * s, D * f - 0.5 * g2 * ds[:, 0]

    t0 = time.perf_counter()
    xs, ds = odeint(func, (x, torch.zeros(x.shape[0], device=x.device)),
                    torch.tensor([t_eps, sde.T], device=x.device), rtol=tol, atol=tol, method="dopri5")
    sync(x.device)
    sec = time.perf_counter() - t0
    return sde.prior_log_prob(xs[-1]) + ds[-1], nfe["n"], sec


# name: (speed-ups of the network, options of log_likelihood). Torch.compile'd variants run without compaction: with
# dynamic=False every batch size of the compaction ladder would compile anew (~70 s each) inside the timed solve.
VARIANTS = {
    "plain": ({}, {}),
    "compact": ({}, {"compact": True}),
    "shampine": ({}, {"solver": "dopri5_shampine"}),  # torchdiffeq's error weights (2/3 of Hairer's): (b)'s semantics
    # (b)'s method, error weights and I controller (err^-1/5), per sample and sync-free: the per-call cost alone
    "as_b": ({}, {"solver": "dopri5_shampine", "controller": PIController(beta1=1.0, beta2=0.0)}),
    "tf32": ({"tf32": True}, {"compact": True}),
    "channels_last": ({"channels_last": True}, {"compact": True}),
    "bf16": ({"autocast": torch.bfloat16}, {"compact": True}),
    "compile": ({"compile": True, "tf32": True}, {}),
    "cudagraphs": ({"compile": True, "compile_mode": "reduce-overhead", "tf32": True}, {}),
    "compile_bf16": ({"compile": True, "autocast": torch.bfloat16}, {}),
}
# the order of the runs: what the goals need first, so that a run cut short by --deadline loses the least
ORDER = ("(b)", "plain", "(a)", "compact", "se", "cudagraphs", "compile", "as_b", "tf32", "shampine", "bf16",
         "channels_last", "compile_bf16")
COMPILE_S = 90.0  # a guess of torch.compile's time for one shape (72 s in the reference run), for the deadline


class Report:
    """The rows measured so far, printed as they come and written to ``path`` (JSON) after each one."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path, self.meta, self.rows = path, meta, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        extra = f", compile {row['compile_s']:.0f} s" if row.get("compile_s") else ""
        print(f"  done: {row['method']}: {row['calls']} calls, {row['seconds']:.1f} s{extra}", flush=True)
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        rows = [{k: v for k, v in r.items() if k != "log_p"} for r in self.rows]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({**self.meta, "rows": rows}, fh, indent=1)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous complete file


def table(report: Report, floor: float) -> None:
    rows = report.rows
    b = next((r for r in rows if r["method"].startswith("(b)")), None)
    sec_a = next((r["seconds"] for r in rows if r["method"].startswith("(a)")), float("nan"))
    sec_b = b["seconds"] if b else float("nan")
    head = (f"{'method':<40} {'calls':>6} {'rows':>7} {'wall s':>8} {'ms/call':>8} {'/floor':>7} {'log p':>10} "
            f"{'|d| vs (b)':>10} {'vs (a)':>7} {'vs (b)':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lp = r["log_p"].double().cpu()
        d = float((lp - b["log_p"].double().cpu()).abs().mean()) if b else float("nan")
        r.update(abs_diff_vs_b=d, speedup_vs_a=sec_a / r["seconds"], speedup_vs_b=sec_b / r["seconds"])
        print(f"{r['method']:<40} {r['calls']:>6d} {r['rows']:>7d} {r['seconds']:>8.2f} "
              f"{1e3 * r['seconds'] / r['calls']:>8.1f} {r['seconds'] / r['calls'] / floor:>7.2f} "
              f"{lp.mean():>10.2f} {d:>10.3f} {sec_a / r['seconds']:>7.2f} {sec_b / r['seconds']:>7.2f}")
    report.write()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--t-eps", type=float, default=1e-5)
    p.add_argument("--skip-scipy", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a small UNet (CPU smoke run)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-probes-check", action="store_true", help="skip the 4-probe run (standard error)")
    p.add_argument("--se-tol", type=float, default=1e-3,
                   help="tolerance of the 4-probe run: the probes' spread, not the ODE error, sets the standard error")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start: skip the runs that would not end before then")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (after every row)")
    args = p.parse_args()
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = make_unet(args.tiny).to(device).eval()
    for prm in unet.parameters():
        prm.requires_grad_(False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, UNet2DModel {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, "
          f"batch {args.batch}, rtol = atol = {args.tol:g}, float32, torch {torch.__version__}", flush=True)
    sde = ss.VPSDE()
    x = (torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    # the probe log_likelihood draws from this seed, so every method integrates the same estimator
    eps = draw_probes(x, 1, "rademacher", torch.Generator(device=device).manual_seed(2))
    plain = ss.ScoreModel(eps_net(unet), sde, prediction="eps")
    floor = floor_ms(plain, x, eps, device)
    print(f"floor: one forward + one VJP = {1e3 * floor:.1f} ms", flush=True)
    report = Report(args.json, {"floor_s": floor, "device": name, "batch": args.batch, "tol": args.tol,
                                "torch": torch.__version__})
    est_calls = 1000  # calls of a solve, until one has been measured

    def fits(seconds: float, what: str) -> bool:
        if args.deadline is None or time.perf_counter() - start + seconds <= args.deadline:
            return True
        print(f"  skipped: {what} (about {seconds:.0f} s would pass the deadline of {args.deadline:.0f} s)", flush=True)
        return False

    plan = [k for k in ORDER if (k not in VARIANTS or k in args.variants)
            and not (k == "(a)" and args.skip_scipy) and not (k == "se" and args.no_probes_check)]
    for key in plan:
        if key == "(a)":
            if fits(2.0 * est_calls * floor, key):  # two network calls per evaluation and the host copies
                lp, nfe, sec = scipy_baseline(plain, sde, x, eps, args.t_eps, args.tol)
                report.add({"method": "(a) scipy RK45, host, separate calls", "calls": nfe, "rows": nfe * args.batch,
                            "seconds": sec, "log_p": lp})
        elif key == "(b)":
            if fits(1.3 * est_calls * floor, key):
                lp, nfe, sec = torchdiffeq_baseline(plain, sde, x, eps, args.t_eps, args.tol)
                est_calls = nfe
                report.add({"method": "(b) torchdiffeq dopri5, fused", "calls": nfe, "rows": nfe * args.batch,
                            "seconds": sec, "log_p": lp})
        elif key == "se":
            # the Hutchinson standard error of a one-probe log p, from the spread of 4 probes
            if fits(4.0 * 0.3 * est_calls * floor, key):
                r4 = ss.log_likelihood(plain, sde, x, rtol=args.se_tol, atol=args.se_tol, t_eps=args.t_eps, probes=4,
                                       generator=torch.Generator(device=device).manual_seed(3), compact=True)
                se = float(2 * r4.std_error.double().cpu().mean())  # 4-probe error x sqrt(4): one probe's
                report.meta["std_error_one_probe"] = se
                print(f"  Hutchinson standard error of a one-probe log p (4 probes at rtol {args.se_tol:g}): "
                      f"mean {se:.2f} nats", flush=True)
                report.write()
        else:
            net_kw, solve_kw = VARIANTS[key]
            compiled = bool(net_kw.get("compile"))
            if not fits((COMPILE_S if compiled else 0.0) + 1.1 * est_calls * floor, key):
                continue
            try:
                net = accelerate(unet, **net_kw)
                model = ss.ScoreModel(eps_net(net), sde, prediction="eps")
                c0 = time.perf_counter()
                if compiled:  # compile (and capture) for the batch shape outside the timed solve
                    floor_ms(model, x, eps, device, reps=1)
                compile_s = time.perf_counter() - c0
                t0 = time.perf_counter()
                r = ss.log_likelihood(model, sde, x, rtol=args.tol, atol=args.tol, t_eps=args.t_eps,
                                      generator=torch.Generator(device=device).manual_seed(2), **solve_kw)
                sync(device)
                sec = time.perf_counter() - t0
            except Exception as err:  # report and go on: one failing speed-up must not lose the other rows
                print(f"  {key}: failed: {type(err).__name__}: {err}", flush=True)
                continue
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            report.add({"method": f"scoresolve [{key}]", "calls": r.calls, "rows": r.rows, "seconds": sec,
                        "log_p": r.log_prob, "compile_s": compile_s if compiled else None,
                        "nfe_mean": float(r.nfe.double().mean())})
    table(report, floor)
    se = report.meta.get("std_error_one_probe")
    if se is not None:
        print(f"Hutchinson standard error of one probe's log p: {se:.2f} nats (|d| vs (b) should lie within it)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
