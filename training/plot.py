"""A PNG of a run's curves: training and held-out loss, and tokens/s, against the step."""

from __future__ import annotations

import os

from training.metrics import read_metrics


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write RUN_DIR/metrics.png (or `out`) from RUN_DIR/metrics.jsonl; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], label="train loss", lw=1)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="held-out loss")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.plot(steps, [r["tokens_per_s"] for r in records], lw=1, color="tab:green")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    mfu = [r.get("mfu", 0.0) for r in records]
    if any(mfu):
        ax_mfu = ax_speed.twinx()
        ax_mfu.plot(steps, [100 * m for m in mfu], lw=0.8, color="tab:gray", alpha=0.6)
        ax_mfu.set_ylabel("MFU (%)")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
