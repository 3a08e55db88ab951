"""Plot the few-step comparison against the peers (`peers_few_step.py --json` files): per problem, the best peer
run's error over ours (the oracle ratio; above 1: ours is better), for the default and the calibrated sampler, by
budget and metric, against the issue's lines (a median of 2, no problem below 1 / 1.2).

    python benchmarks/plot_peers.py benchmarks/results/peers_few_step_b64_calibrated.json \
        benchmarks/results/peers_few_step_b64_calibrated_8_20.json --out docs/img/peers_few_step.png
"""

from __future__ import annotations

import argparse
import json
import statistics

LABELS = {"rms": "RMS error over the batch", "median": "the median sample's error"}
COLORS = {"default": "tab:blue", "calibrated": "tab:orange"}


def ratios(paths: list[str]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{metric: {sampler: {nfe: [oracle ratio per problem]}}} merged over the files (a later file's budget wins)."""
    out: dict = {}
    for path in paths:
        with open(path) as f:
            summary = json.load(f)["summary_by_metric"]
        for metric, by_key in summary.items():
            for key, by_nfe in by_key.items():
                for n, s in by_nfe.items():
                    out.setdefault(metric, {}).setdefault(key, {})[int(n)] = list(s["oracle"])
    return out


def plot(data: dict, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in LABELS if m in data]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        keys = [k for k in COLORS if k in data[metric]]
        nfes = sorted({n for k in keys for n in data[metric][k]})
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            for i, n in enumerate(nfes):
                vals = data[metric][key].get(n)
                if not vals:
                    continue
                x0 = i + (j - (len(keys) - 1) / 2) * width
                xs = [x0 + width * 0.6 * ((k % 7) / 6 - 0.5) for k in range(len(vals))]
                ax.scatter(xs, vals, s=14, color=COLORS[key], alpha=0.7, label=key if i == 0 else None)
                med = statistics.median(vals)
                ax.plot([x0 - width * 0.4, x0 + width * 0.4], [med, med], color=COLORS[key], lw=2.5)
        for y, style, text, va in ((2.0, "--", "goal: median 2", "bottom"), (1.0, "-", "parity", "bottom"),
                                   (1 / 1.2, ":", "worst allowed: 1/1.2", "top")):
            ax.axhline(y, color="gray", ls=style, lw=1)
            ax.text(len(nfes) - 0.55, y, text, fontsize=7, color="gray", va=va, ha="right")
        ax.set_yscale("log")
        ax.set_xticks(range(len(nfes)), [f"{n} NFE" for n in nfes])
        ax.set_title(LABELS[metric], fontsize=10)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    axes[0][0].set_ylabel("best peer run's error / ours (per problem)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", help="peers_few_step.py --json files (their summary_by_metric)")
    ap.add_argument("--out", default="peers_few_step.png")
    ap.add_argument("--title", default="few-step sampling against every peer run, random Gaussian mixtures")
    args = ap.parse_args()
    data = ratios(args.json)
    for metric, by_key in data.items():
        for key, by_nfe in by_key.items():
            for n, vals in sorted(by_nfe.items()):
                print(f"{metric:>6} {key:>10} {n:>3} NFE: median {statistics.median(vals):.2f} "
                      f"worst {min(vals):.2f} ({len(vals)} problems)")
    plot(data, args.out, args.title)


if __name__ == "__main__":
    main()
