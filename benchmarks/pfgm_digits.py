"""Work-precision of the ODE solvers on trained PFGM++ digits models, one per D (the small-D robustness claim).

For each model (a checkpoint of `scoresolve train --sde pfgmpp --sde-arg D=...`, all with identical settings): the
network in ``--dtype`` (float32 by default: the errors measured are far above its rounding), x_T from the model's
own PFGM++ prior (seed 0, the same Gaussian and Gamma draws for every D), a reference solve of the PF-ODE
(dopri5, rtol = atol = ``--ref-tol``) from sigma_max = 80 to sigma_min = 0.002, then each solver at each NFE on
EDM's karras grid (rho = 7) through `PFGMPP.edm_view()` (the same ODE).

Reported per (D, solver, NFE): the median over samples of the per-sample RMS pixel error against the reference
(pixels in [-1, 1]), and a sample-quality proxy: the sliced Wasserstein-2 distance (256 projections) between the
samples and as many held-out digits (uniformly dequantized, seed 0), next to the reference samples' own distance.

With ``--alphas``, the PFGM++ reference's robustness test (its ``generate_alpha.py``): EDM's Heun sampler, 18 steps
(35 NFE) on the karras grid, with x += alpha * sigma_i * z (z ~ N(0, I)) added before every step, i.e. an error of
relative size alpha injected along the trajectory; reported: the SWD of ``--alpha-batch`` samples to as many
held-out digits, and their median RMS distance from the alpha = 0 samples of the same x_T.
CPU, one thread, minutes.

    python benchmarks/pfgm_digits.py --model 128=scoresolve/models/checkpoints/digits_pfgmpp.pt \
        --model 8=runs/D8/model.pt ... [--batch 64] [--out benchmarks/results/pfgm_digits.json] [--add]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import scoresolve as ss
from scoresolve.compare import float64_model, sliced_wasserstein
from scoresolve.data import dequantize, digits
from scoresolve.models import load_checkpoint

F64 = torch.float64


def per_sample_rms(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """RMS pixel error of each sample ``[batch]``."""
    return (x.double() - ref.double()).flatten(1).square().mean(1).sqrt()


def run_model(label: str, path: str, solvers: list[str], nfes: list[int], batch: int, ref_tol: float,
              test: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    model, sde, config = load_checkpoint(path)
    if not isinstance(sde, ss.PFGMPP):
        raise SystemExit(f"{path} is not a PFGM++ model ({sde!r})")
    net = float64_model(model.net) if dtype == F64 else model.net
    view = sde.edm_view()
    m = ss.ScoreModel(net, view, prediction="x0", time="t")
    x_T = sde.prior_sample((batch, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=dtype)
    t_eps = sde.sigma_min
    t0 = time.perf_counter()
    ref = ss.sample(m, view, x_T, solver="dopri5", rtol=ref_tol, atol=ref_tol, t_eps=t_eps)
    ref_nfe = float(ref.nfe.double().mean()) if torch.is_tensor(ref.nfe) else float(ref.nfe)
    out = {"label": label, "D": sde.D, "checkpoint": path, "steps": config.steps, "ref_tol": ref_tol,
           "dtype": str(dtype).replace("torch.", ""),
           "ref_nfe": ref_nfe, "ref_seconds": time.perf_counter() - t0,
           "ref_swd": sliced_wasserstein(ref.x, test), "runs": []}
    print(f"D = {label}: reference dopri5 rtol=atol={ref_tol:g}, NFE {ref_nfe:.0f}, SWD to held-out "
          f"{out['ref_swd']:.4f} ({out['ref_seconds']:.0f} s)", flush=True)
    for solver in solvers:
        for nfe in nfes:
            try:
                sol = ss.sample(m, view, x_T, solver=solver, nfe=nfe, grid="karras", t_eps=t_eps)
            except ValueError as e:  # too few NFE for the solver, or refused
                out["runs"].append({"solver": solver, "nfe": nfe, "error": None, "why": str(e)[:200]})
                continue
            err = per_sample_rms(sol.x, ref.x)
            used = float(sol.nfe.double().mean()) if torch.is_tensor(sol.nfe) else float(sol.nfe)
            finite = bool(torch.isfinite(sol.x).all())
            out["runs"].append({
                "solver": solver, "nfe": nfe, "nfe_used": used,
                "median_rms": float(err.median()) if finite else math.inf,
                "mean_rms": float(err.mean()) if finite else math.inf,
                "swd": sliced_wasserstein(sol.x, test) if finite else math.inf,
            })
    return out


def heun_injected(m, view, x_T: torch.Tensor, grid: torch.Tensor, alpha: float, g: torch.Generator):
    """Heun (2nd order on every step) on ``grid`` (sigma_max -> sigma_min > 0) with x += alpha * sigma_i * z before
    each step, as the reference's ``generate_alpha.py`` (which ends with an Euler step to sigma = 0)."""
    x = x_T.clone()
    with torch.no_grad():
        for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            if alpha:
                x = x + alpha * t_cur * torch.randn(x.shape, generator=g, dtype=x.dtype)
            d = (x - m.raw(x, torch.full((x.shape[0],), t_cur, dtype=x.dtype))) / t_cur
            x_e = x + (t_next - t_cur) * d
            d2 = (x_e - m.raw(x_e, torch.full((x.shape[0],), t_next, dtype=x.dtype))) / t_next
            x = x + (t_next - t_cur) * 0.5 * (d + d2)
    return x


def robustness(label: str, path: str, alphas: list[float], batch: int, test: torch.Tensor) -> dict:
    model, sde, _ = load_checkpoint(path)
    view = sde.edm_view()
    m = ss.ScoreModel(model.net, view, prediction="x0", time="t")
    x_T = sde.prior_sample((batch, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    grid = sde.karras_grid(18)
    rows, clean = [], None
    for alpha in alphas:
        x = heun_injected(m, view, x_T, grid, alpha, torch.Generator().manual_seed(1))
        if clean is None:
            clean = x
        rows.append({"alpha": alpha, "swd": sliced_wasserstein(x, test[:batch]),
                     "median_rms_vs_clean": float(per_sample_rms(x, clean).median())})
    print(f"D = {label}: " + ", ".join(f"alpha {r['alpha']:g}: SWD {r['swd']:.4f}, "
                                       f"dev {r['median_rms_vs_clean']:.3f}" for r in rows), flush=True)
    return {"label": label, "D": sde.D, "batch": batch, "rows": rows}


def table(results: list[dict], solvers: list[str], nfes: list[int], key: str, fmt: str) -> str:
    lines = ["| D | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for res in results:
        for solver in solvers:
            cells = []
            for nfe in nfes:
                run = next(r for r in res["runs"] if r["solver"] == solver and r["nfe"] == nfe)
                cells.append("-" if run.get(key) is None else format(run[key], fmt))
            lines.append(f"| {res['label']} | {solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(results: list[dict], solvers: list[str], nfes: list[int]) -> None:
    print("\nMedian per-sample RMS pixel error against each model's own reference:\n")
    print(table(results, solvers, nfes, "median_rms", ".1e"))
    print("\nSliced W2 to held-out digits (reference samples: " + ", ".join(
        f"D = {r['label']}: {r['ref_swd']:.4f} (NFE {r['ref_nfe']:.0f})" for r in results) + "):\n")
    print(table(results, solvers, nfes, "swd", ".4f"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                    help="a PFGM++ digits checkpoint and its label (e.g. 128=...), repeatable")
    ap.add_argument("--solvers", default="euler,heun,dpmpp_2m,unipc,ipndm,vab")
    ap.add_argument("--nfe", default="5,10,20,35,50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ref-tol", type=float, default=1e-6)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", default="benchmarks/results/pfgm_digits.json")
    ap.add_argument("--add", action="store_true", help="add these models' rows to --out's (same settings)")
    ap.add_argument("--print", action="store_true", help="print the tables of --out and stop")
    ap.add_argument("--alphas", default="", help="run only the injected-error test at these alphas, e.g. 0,0.1,0.2")
    ap.add_argument("--alpha-batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    solvers, nfes = args.solvers.split(","), [int(n) for n in args.nfe.split(",")]
    if args.print:
        with open(args.out) as f:
            old = json.load(f)
        print_tables(old["results"], old["solvers"], old["nfes"])
        for r in old.get("robustness", []):
            print(f"D = {r['label']} (alpha: SWD, median RMS from alpha = 0): " + ", ".join(
                f"{x['alpha']:g}: {x['swd']:.4f}, {x['median_rms_vs_clean']:.3f}" for x in r["rows"]))
        return
    if not args.model:
        raise SystemExit("give --model LABEL=PATH (repeatable), or --print")
    if args.alphas:
        alphas = [float(a) for a in args.alphas.split(",")]
        test = dequantize(digits("test")[: args.alpha_batch], generator=torch.Generator().manual_seed(0))
        with open(args.out) as f:
            old = json.load(f)
        labels = {spec.partition("=")[0] for spec in args.model}
        rob = [r for r in old.get("robustness", []) if r["label"] not in labels]
        for spec in args.model:
            label, _, path = spec.partition("=")
            rob.append(robustness(label, path, alphas, args.alpha_batch, test))
        old["robustness"] = sorted(rob, key=lambda r: r["D"])
        with open(args.out, "w") as f:
            json.dump(old, f, indent=1)
        return
    test = dequantize(digits("test")[: args.batch], generator=torch.Generator().manual_seed(0)).double()
    if test.shape[0] < args.batch:
        raise SystemExit(f"--batch {args.batch}: the held-out split has {test.shape[0]} images")
    results = []
    extra = {}
    if args.out and args.add and os.path.exists(args.out):  # keep the other models' rows of an earlier run
        with open(args.out) as f:
            old = json.load(f)
        if (old["batch"], old["nfes"], old["solvers"]) != (args.batch, nfes, solvers):
            raise SystemExit(f"--add: {args.out} was written with other --batch / --nfe / --solvers")
        labels = {spec.partition("=")[0] for spec in args.model}
        results = [r for r in old["results"] if r["label"] not in labels]
        extra = {"robustness": old["robustness"]} if "robustness" in old else {}
    for spec in args.model:
        label, _, path = spec.partition("=")
        results.append(run_model(label, path, solvers, nfes, args.batch, args.ref_tol, test,
                                 getattr(torch, args.dtype)))
    results.sort(key=lambda r: r["D"])
    print_tables(results, solvers, nfes)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "nfes": nfes, "solvers": solvers, "results": results, **extra}, f,
                      indent=1)
        print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
