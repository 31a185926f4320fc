"""PNG figure of ``tokenmill bench serve`` results (matplotlib, Agg backend).

Top row: CDFs over requests of TTFT, TPOT and end-to-end latency, one line per run. Bottom row (sweeps
of more than one concurrency): output tokens/s and median TTFT against concurrency.
"""
from __future__ import annotations

from typing import Any

_CDFS = (("ttft", "TTFT (ms)", 1000.0), ("tpot", "TPOT (ms)", 1000.0), ("e2e", "end-to-end latency (s)", 1.0))


def _run_label(run: dict[str, Any]) -> str:
    c = run.get("concurrency")
    rate = run.get("request_rate")
    label = f"concurrency {c}" if c else "unbounded"
    if rate not in (None, "inf"):
        label += f", {rate:g} req/s"
    return label


def plot_serve_results(results: dict[str, Any], path: str) -> None:
    """Write the figure for a ``tokenmill bench serve`` result dict (its ``runs`` with per-request data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sweep = len(runs) > 1 and all(r.get("concurrency") for r in runs)
    fig, axes = plt.subplots(2 if sweep else 1, 3, figsize=(15, 8.5 if sweep else 4.5), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], _CDFS):
        for run in runs:
            xs = sorted(r[metric] * scale for r in run.get("requests", [])
                        if r.get("success") and r.get(metric) is not None)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=_run_label(run))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"CDF of {label}", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8)
    if sweep:
        cs = [r["concurrency"] for r in runs]
        tput = [r["output_throughput"] for r in runs]
        ttft = [1000 * (r["ttft"]["median"] or 0.0) for r in runs]
        ax = axes[1][0]
        ax.plot(cs, tput, marker="o", color="#2a7ab9")
        ax.set_title("output tokens/s vs concurrency", fontsize=10)
        ax.set_ylabel("output tokens/s")
        ax = axes[1][1]
        ax.plot(cs, ttft, marker="o", color="#d9822b")
        ax.set_title("median TTFT vs concurrency", fontsize=10)
        ax.set_ylabel("median TTFT (ms)")
        for ax in axes[1][:2]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
        axes[1][2].axis("off")
    wl = results.get("workload", {})
    fig.suptitle(f"{wl.get('name', '')}: {wl.get('num_requests', '?')} requests to {results.get('base_url', '')} "
                 f"({results.get('model') or 'model ?'}, {results.get('endpoint', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
