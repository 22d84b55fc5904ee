"""Plots of metrics.jsonl: a run's loss, learning rate, gradient norm and throughput over iterations, and
the val loss curves of every job of a sweep side by side."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from hydragpt.errors import UserError
from hydragpt.loggers import METRICS_FILE, is_suite_score, read_metrics

PLOT_FILE = Path("plots") / "metrics.png"
SWEEP_PLOT_FILE = "val_loss.png"
# The keys each kind of metrics.jsonl record must have to be drawn.
TRAINING_KEYS = {"iter", "loss", "lr", "grad_norm", "tokens_per_sec"}
EVALUATION_KEYS = {"iter", "train_loss", "val_loss"}


def _pyplot() -> ModuleType:
    """matplotlib, imported on first use: half a second that runs which never plot should not pay."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path) -> Path:
    """Draw the run's curves into `<run_dir>/plots/metrics.png` and return that path."""
    records = read_metrics(run_dir)
    steps = [r for r in records if r.keys() >= TRAINING_KEYS]
    evals = [r for r in records if r.keys() >= EVALUATION_KEYS]
    if not steps and not evals:
        raise UserError(
            f"{run_dir / METRICS_FILE} holds no training or evaluation records",
            "plot a run that has logged at least one step",
        )

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    loss_ax, lr_ax, norm_ax, speed_ax = axes.flat
    loss_ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], label="train (batch)", alpha=0.5)
    loss_ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    loss_ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    loss_ax.set(title="loss", xlabel="iter")
    loss_ax.legend(loc="upper left")
    scores = sorted({k for r in evals for k in r if k == "hellaswag_acc_norm" or is_suite_score(k)})
    if scores:  # train.hellaswag_interval, train.eval_suite_interval: scores on their own axis, on the right
        score_ax = loss_ax.twinx()
        for n, key in enumerate(scores):
            scored = [r for r in evals if key in r]
            score_ax.plot([r["iter"] for r in scored], [r[key] for r in scored], "s--", color=f"C{3 + n}", label=key)
        score_ax.set(ylabel="score")
        score_ax.legend(loc="upper right")
    lr_ax.plot([r["iter"] for r in steps], [r["lr"] for r in steps])
    lr_ax.set(title="learning rate", xlabel="iter")
    norm_ax.plot([r["iter"] for r in steps], [r["grad_norm"] for r in steps])
    norm_ax.set(title="gradient norm (before clipping)", xlabel="iter", yscale="log")
    speed_ax.plot([r["iter"] for r in steps], [r["tokens_per_sec"] for r in steps])
    speed_ax.set(title="tokens/s", xlabel="iter")
    fig.suptitle(str(run_dir))
    fig.tight_layout()

    out = run_dir / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(sweep_dir: Path) -> Path:
    """Draw every job's val loss curve into `<sweep_dir>/val_loss.png`, labelled with what the job changed."""
    from hydragpt.sweep import sweep_rows

    rows = sweep_rows(sweep_dir)
    if not rows:
        raise UserError(f"{sweep_dir} holds no finished sweep jobs", "give the multirun/<date>/<time> directory")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    for row in rows:
        run_dir = sweep_dir / str(row["job"])
        if not (run_dir / METRICS_FILE).is_file():
            continue
        evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
        label = f"{row['job']}: {row['overrides'] or '(no overrides)'}" + (
            " [failed]" if row["status"] == "failed" else ""
        )
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label=label)
    ax.set(title=f"val loss, {sweep_dir}", xlabel="iter", ylabel="val loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = sweep_dir / SWEEP_PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
