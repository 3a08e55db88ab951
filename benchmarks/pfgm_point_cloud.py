"""Work-precision of the ODE solvers on PFGM++ for several D, on an exact point-cloud model (scoresolve.PointCloud).

For each D: x_T from the PFGM++ prior (D = inf: EDM's Gaussian prior and kernel), a reference solve of the PF-ODE
(dopri5, rtol = atol = 1e-10), then each solver at 5-50 NFE on EDM's karras grid (rho = 7, sigma 80 -> 0.002)
through `PFGMPP.edm_view()`. Error: median over samples of |x - x_ref| (a few trajectories near basin boundaries
end at another point at any NFE; the median ignores them), and the fraction of samples that end at another point
than the reference's. Prints a Markdown table. CPU, float64, seconds.

    python benchmarks/pfgm_point_cloud.py [--dim 16] [--points 8] [--batch 500]
"""

from __future__ import annotations

import argparse
import math

import torch

import scoresolve as ss

F64 = torch.float64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--solvers", default="heun,dpmpp_2m,unipc")
    ap.add_argument("--nfe", default="5,10,20,50")
    ap.add_argument("--D", default="1,8,128,2048,inf")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    points = torch.randn(args.points, args.dim, generator=g, dtype=F64)
    cloud = ss.PointCloud(points, torch.rand(args.points, generator=g, dtype=F64) + 0.5)
    nfes = [int(n) for n in args.nfe.split(",")]
    print("| D | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for Ds in args.D.split(","):
        D = math.inf if Ds == "inf" else float(Ds)
        if math.isinf(D):
            proc = view = ss.EDMSDE(T=80.0)
            t_eps = 0.002
        else:
            proc = ss.PFGMPP(D=D)
            view, t_eps = proc.edm_view(), proc.sigma_min
        x_T = proc.prior_sample((args.batch, args.dim), generator=torch.Generator().manual_seed(1), dtype=F64)
        model = ss.ScoreModel(lambda x, t, proc=proc: cloud.x0(x, t, proc), view, prediction="x0")
        ref = ss.sample(model, view, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=t_eps).x
        ref_idx = cloud.nearest(ref)
        for solver in args.solvers.split(","):
            cells = []
            for nfe in nfes:
                try:
                    out = ss.sample(model, view, x_T, solver=solver, nfe=nfe, grid="karras", t_eps=t_eps)
                except ValueError:
                    cells.append("-")
                    continue
                err = float((out.x - ref).norm(dim=1).median())
                moved = float((cloud.nearest(out.x) != ref_idx).double().mean())
                cells.append(f"{err:.1e} ({100 * moved:.1f}%)")
            print(f"| {Ds} | {solver} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
