"""Per-call overhead of the samplers outside the network, against k-diffusion, diffusers and torchdiffeq.

The network is nearly free (a 2-D state, the exact x0 = 0 prediction, i.e. ``torch.zeros_like``), so the wall time
per network call is the sampler's own cost: coefficients, history, bookkeeping, guards. Each pair runs interleaved in
the same process (``--repeats`` rounds, ours then theirs back to back); the ratio is the median over the rounds of
ours / theirs per call (at or below 1: no more overhead). Pairing the two runs of a round cancels most of the drift of
a shared machine's load; the us/call columns are the medians. The clock is the process's CPU time by default (on a
shared machine the time spent waiting for a core is not the sampler's; ``--clock wall`` for elapsed time).

- every registered grid sampler (default options; the stochastic ones with a generator) at 50 NFE against
  k-diffusion's ``sample_dpmpp_2m`` on Karras sigmas (the reference of issue 28), vab at orders 1-4 too;
- where a peer implements the same method: k-diffusion's ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` /
  ``sample_dpmpp_3m_sde`` (eta = 0) / ``sample_dpmpp_2m_sde`` / ``sample_euler_ancestral`` / ``sample_lms`` and
  diffusers' DPMSolverMultistep / UniPCMultistep / DEISMultistep / DDIM loops (``scale_model_input`` + ``step``);
- adaptive: ``sample(solver=...)`` at rtol = atol = 1e-5 against ``torchdiffeq.odeint`` on the same probability-flow
  ODE, per network call: dopri5 and bosh3 against the same methods, tsit5 / dopri5_shampine against dopri5 and
  vern6 / vern7 against dopri8.

    python benchmarks/overhead.py [--batch 1 1024] [--repeats 9] [--threads 1] [--only NAME ...] [--json out.json]
        [--compiled eager compile] [--device cuda --clock wall --compiled eager cuda_graph compile]

``--compiled`` adds `compile_sampler` (the recorded solve, `scoresolve.compiled`) for dpmpp_2m and the
default sampler in the given modes, built before the timing (the build time is in the row's name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _kdiffusion import load_k_diffusion_sampling  # noqa: E402

import scoresolve as ss  # noqa: E402
from scoresolve.solvers import REGISTRY, AdaptiveSolver, GridSolver  # noqa: E402

NFE = 50
TOL = 1e-5


CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["process"]


_sync = None  # torch.cuda.synchronize on a GPU run: time the device's work, not only its launch


def _timed(fn) -> float:
    if _sync is not None:
        _sync()
    t0 = _clock()
    calls = fn()
    if _sync is not None:
        _sync()
    return (_clock() - t0) / calls


def _ours(model, sde, x_T, solver: str | None, **kw):
    def run():
        sol = ss.sample(model, sde, x_T, solver=solver, **kw)
        adaptive = solver is not None and isinstance(REGISTRY[solver], AdaptiveSolver)
        return int(sol.calls) if adaptive else int(sol.nfe.max())
    return run


def _kd(kd, fn: str, x_T, sig, net, **kw):
    def run():
        n = [0]

        def den(x, s):
            n[0] += 1
            return net(x, s)  # sigma for t: the same work for a network
        getattr(kd, fn)(den, x_T, sig, disable=True, **kw)
        return n[0]
    return run


def _diffusers(cls, x_T, net):
    def run():
        sched = cls(num_train_timesteps=1000, prediction_type="sample")
        sched.set_timesteps(NFE)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            tb = (t.to(x.device, x.dtype) / 1000).expand(x.shape[0])
            x = sched.step(net(xin, tb), t, x, return_dict=False)[0]
        return len(sched.timesteps)
    return run


def _recorded(cs, x_T):
    def run():
        cs(x_T)
        return cs.nfe
    return run


# registered grid solver -> (k-diffusion sampler, its keywords) doing the same job
KD_PEERS = {
    "euler": ("sample_euler", {}), "heun": ("sample_heun", {}), "dpm_solver_2": ("sample_dpm_2", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_3m": ("sample_dpmpp_3m_sde", {"eta": 0.0}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}), "reverse_diffusion": ("sample_euler_ancestral", {}),
    "ipndm": ("sample_lms", {}),
}
DIFFUSERS_PEERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
                   "deis": "DEISMultistepScheduler", "ddim": "DDIMScheduler"}
# adaptive solver -> torchdiffeq method
TD_PEERS = {"dopri5": "dopri5", "bosh3": "bosh3", "tsit5": "dopri5", "dopri5_shampine": "dopri5", "vern6": "dopri8",
            "vern7": "dopri8"}


def network(kind: str, device: str):
    """The x0 prediction: ``zero`` (free: torch.zeros_like) or ``mlp`` (2 -> 64 -> 64 -> 2, SiLU, t as an input)."""
    if kind == "zero":
        return lambda x, t: torch.zeros_like(x)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 2)).to(device).requires_grad_(False)
    return lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def pairs(batch: int, only: list[str] | None = None, device: str = "cpu", compiled: tuple[str, ...] = (),
          net: str = "zero") -> dict:
    """{name: (ours, theirs)}: zero-argument callables that run one solve and return its network calls.
    ``compiled``: `compile_sampler` modes to add for dpmpp_2m and the default sampler; ``net``: see `network`."""
    sde = ss.VPSDE()
    x_T = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0)).to(device)
    fn = network(net, device)
    model = ss.ScoreModel(fn, sde, prediction="x0")
    lam = sde.log_snr(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))
    grid = [n for n, s in REGISTRY.items() if isinstance(s, GridSolver)]
    adaptive = [n for n, s in REGISTRY.items() if isinstance(s, AdaptiveSolver) and not s.stochastic]
    out = {}

    def ours_grid(name: str, **kw):
        if REGISTRY[name].stochastic:
            kw["generator"] = torch.Generator(device=device).manual_seed(0)
        return _ours(model, sde, x_T, name, nfe=NFE, **kw)

    kd = load_k_diffusion_sampling()
    if kd is not None:
        sig = kd.get_sigmas_karras(NFE, smin, smax, device=device)
        ref = _kd(kd, "sample_dpmpp_2m", x_T, sig, fn)
        out["default (vab) | k-diffusion sample_dpmpp_2m"] = (_ours(model, sde, x_T, None, nfe=NFE), ref)
        for name in grid:
            out[f"{name} | k-diffusion sample_dpmpp_2m"] = (ours_grid(name), ref)
        for order in (1, 2, 3, 4):
            out[f"vab order {order} | k-diffusion sample_dpmpp_2m"] = (ours_grid("vab", order=order), ref)
        for name, (kfn, kw) in KD_PEERS.items():
            # heun and dpm_2 use 2 calls per step: the same 50 NFE takes half as many sigmas
            s = kd.get_sigmas_karras(NFE // REGISTRY[name].evals() + 1, smin, smax, device=device) \
                if REGISTRY[name].evals() > 1 else sig
            out[f"{name} | k-diffusion {kfn}"] = (ours_grid(name), _kd(kd, kfn, x_T, s, fn, **kw))
        for mode in compiled:  # the recorded solve (built once, outside the timing; compile time is reported)
            for name in ("dpmpp_2m", None):
                if only and (name or "default") not in only:
                    continue
                t0 = time.perf_counter()
                cs = ss.compile_sampler(model, sde, x_T, solver=name, nfe=NFE, mode=mode)
                label = f"{name or 'default'} compile_sampler({mode} -> {cs.active}, built in " \
                        f"{time.perf_counter() - t0:.0f} s)"
                out[f"{label} | k-diffusion sample_dpmpp_2m"] = (_recorded(cs, x_T), ref)
    try:
        import diffusers

        for name, cls in DIFFUSERS_PEERS.items():
            out[f"{name} | diffusers {cls}"] = (ours_grid(name), _diffusers(getattr(diffusers, cls), x_T, fn))
    except ImportError:
        pass
    try:
        import torchdiffeq

        pf = sde.probability_flow(model)

        def td(method: str):
            def run():
                n = [0]

                def f(t, x):
                    n[0] += 1
                    return pf.drift(x, t.clamp(1e-5, 1.0).to(x.dtype).expand(x.shape[0]))  # its first trial overshoots
                torchdiffeq.odeint(f, x_T, torch.tensor([1.0, 1e-3], device=device), method=method, rtol=TOL,
                                   atol=TOL)
                return n[0]
            return run

        for name in adaptive:
            if name in TD_PEERS:
                out[f"{name} | torchdiffeq {TD_PEERS[name]}"] = (_ours(model, sde, x_T, name, rtol=TOL, atol=TOL),
                                                               td(TD_PEERS[name]))
    except ImportError:
        pass
    if only:
        out = {k: v for k, v in out.items() if k.split(" | ")[0].split(" ")[0] in only}
    return out


def measure(a, b, repeats: int) -> dict:
    """Interleaved rounds: medians of us/call and the median of the per-round ratios."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed(a))
        tb.append(_timed(b))
    ratios = [x / y for x, y in zip(ta, tb)]
    return {"ours_us": statistics.median(ta) * 1e6, "theirs_us": statistics.median(tb) * 1e6,
            "ratio": statistics.median(ratios), "ratio_min_over_min": min(ta) / min(tb)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=None, help="our solver names to run (default: all)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then use --clock wall)")
    ap.add_argument("--net", choices=["zero", "mlp"], default="zero",
                    help="zero: a free x0 = 0 network (the sampler's own cost); mlp: a small MLP")
    ap.add_argument("--compiled", nargs="*", default=[], choices=["eager", "compile", "cuda_graph"],
                    help="compile_sampler modes to measure (dpmpp_2m and the default sampler)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="process",
                    help="process: this process's CPU time (default; a shared machine's waits for a core do not "
                         "count), wall: elapsed time")
    args = ap.parse_args(argv)
    global _clock, _sync
    _clock = CLOCKS[args.clock]
    if args.device.startswith("cuda"):
        _sync = torch.cuda.synchronize
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # pc's low-dimension warning, singlestep coarse-grid warnings
    rows: list[dict] = []
    meta = {"clock": args.clock, "nfe": NFE, "tol": TOL, "repeats": args.repeats, "threads": args.threads,
            "torch": torch.__version__, "device": args.device, "state": "[batch, 2]",
            "network": {"zero": "x0 = 0 (torch.zeros_like)", "mlp": "x0 MLP 3-64-64-2 SiLU"}[args.net]}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    print(f"{'ours | theirs':<62} {'batch':>6} {'ours us/call':>13} {'theirs us/call':>15} {'ratio':>6}")
    for batch in args.batch:
        for name, (a, b) in pairs(batch, args.only, args.device, tuple(args.compiled), args.net).items():
            r = measure(a, b, args.repeats)
            rows.append({"pair": name, "batch": batch, **{k: round(v, 3) for k, v in r.items()}})
            print(f"{name:<62} {batch:>6} {r['ours_us']:>13.0f} {r['theirs_us']:>15.0f} {r['ratio']:>6.2f}",
                  flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
