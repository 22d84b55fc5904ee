"""Report cards: `report.md` for a run (what it was, on what, how fast, how well, what it says) and for a
sweep (its jobs side by side); what `scripts/report.py` writes, and training at its end.

Everything comes from the run directory: the config Hydra recorded, `metrics.jsonl`, `run.json` (the
hardware and software of each start of training in it, recorded by rank 0 for all ranks), the plots, the
samples training wrote, and the newest checkpoint, which a report may sample from.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import socket
import statistics
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml

from hydragpt.engine.checkpoint import CHECKPOINT_DIR, load_checkpoint, resolve_checkpoint_path
from hydragpt.errors import UserError
from hydragpt.loggers import METRICS_FILE, is_suite_score, read_metrics, tokens_per_sec
from hydragpt.plot import PLOT_FILE

log = logging.getLogger("hydragpt.report")

REPORT_FILE = "report.md"
SESSIONS_FILE = "run.json"  # a list: one entry per process that trained in the run directory
SWEEP_MARKER = "multirun.yaml"  # what Hydra writes at a sweep's root


def record_session(run_dir: Path, facts: dict[str, Any]) -> None:
    """Append this process's facts (where it starts, its plan, its hardware and software) to run.json."""
    path = run_dir / SESSIONS_FILE
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **facts})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(sessions, indent=1) + "\n")
    tmp.replace(path)


def machine(device: torch.device) -> dict[str, Any]:
    """What ran a process: the accelerator (or the CPU's model), the host, and the software versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    try:
        package = version("hydragpt")
    except PackageNotFoundError:  # run from a source tree that pip did not install
        package = "unknown"
    return {
        "device": str(device),
        "device_name": name,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hydragpt": package,
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


# --- one run ------------------------------------------------------------------------------------------


def write_run_report(
    run_dir: Path, samples: int = 2, sample_tokens: int = 100, device: torch.device | None = None
) -> Path:
    """`<run_dir>/report.md`; `samples` continuations from the newest checkpoint (on `device`, the CPU by
    default) when the run wrote none of its own (train.sample_interval), `sample_tokens` tokens each."""
    records = read_metrics(run_dir)
    sessions = _sessions(run_dir)
    config = _config(run_dir)
    evals = [r for r in records if "val_loss" in r]
    checkpoint = _newest_checkpoint(run_dir)
    reached = load_checkpoint(checkpoint, mmap=True, require=("step",))["step"] if checkpoint else None
    summary = _summary(sessions, records, reached)
    lines = [f"# Run report: {run_dir}", "", _status(run_dir, sessions, reached), ""]
    lines += ["## Summary", "", *_table(["", "value"], [[k, v] for k, v in summary.items()]), ""]
    lines += ["## Hardware and software", ""]
    lines += _table(
        ["started", "from step", "device", "ranks", "precision", "torch", "host"],
        [
            [
                s.get("started"),
                s.get("start_iter"),
                f"{s.get('device_name')} ({s.get('device')}, {s.get('cpus')} CPUs)",
                s.get("world_size"),
                f"{s.get('dtype')}{', compiled' if s.get('compile') else ''}",
                s.get("torch"),
                s.get("host"),
            ]
            for s in sessions
        ],
    )
    lines += ["", "## Loss curves", ""]
    if (run_dir / PLOT_FILE).is_file():
        lines += [f"![loss, learning rate, gradient norm and tokens/s]({PLOT_FILE})", ""]
    else:
        lines += [f"(no plot yet: `python scripts/plot.py run={run_dir}` draws {PLOT_FILE})", ""]
    lines += ["## Evaluations", "", *_evaluations(evals), ""]
    lines += ["## Samples", "", *_samples(run_dir, checkpoint, samples, sample_tokens, device or torch.device("cpu"))]
    lines += ["## Config", ""]
    overrides = _overrides(run_dir)
    lines += [f"Command-line overrides: `{' '.join(overrides) or '(none)'}`", ""]
    lines += ["<details><summary>the resolved config</summary>", "", "```yaml", yaml.safe_dump(config).rstrip()]
    lines += ["```", "", "</details>", ""]
    out = run_dir / REPORT_FILE
    out.write_text("\n".join(lines))
    return out


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / SESSIONS_FILE
    try:
        sessions = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        sessions = []
    return [s for s in sessions if isinstance(s, dict)]


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"  # absent where hydra.output_subdir=null
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resume or sample.py would read (the later of last.pt and best.pt), if any."""
    has_one = any((run_dir / CHECKPOINT_DIR / name).is_file() for name in ("last.pt", "best.pt"))
    return resolve_checkpoint_path(run_dir) if has_one else None


def _status(run_dir: Path, sessions: list[dict[str, Any]], reached: int | None) -> str:
    """Finished, or stopped at which step of how many (its newest checkpoint's), and how to continue it."""
    planned = sessions[-1].get("max_iters") if sessions else None
    if reached is None:
        return "**No checkpoint yet**: the run has not reached its first evaluation."
    if planned is not None and reached >= planned:
        return f"**Finished**: {planned:,} steps."
    of = f" of {planned:,}" if planned is not None else ""
    return f"**Stopped** at step {reached:,}{of}; `python scripts/train.py resume={run_dir}` continues it."


def _summary(sessions: list[dict[str, Any]], records: list[dict[str, Any]], reached: int | None) -> dict[str, str]:
    last = sessions[-1] if sessions else {}
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    evals = [r for r in records if "val_loss" in r]
    speed = tokens_per_sec(steps)
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None][1:]
    memory = [r["peak_memory_gib"] for r in steps if "peak_memory_gib" in r]
    val = [r["val_loss"] for r in evals]
    summary = {
        "parameters": f"{last['parameters']:,}" if "parameters" in last else "?",
        "steps": f"{reached:,}" if reached is not None else "0",
        "tokens": f"{steps[-1]['tokens_seen']:,}" if steps else "0",
        "wall time": _duration(wall_seconds(records)),
        "training time": _duration(evals[-1]["train_seconds"]) if evals else "?",
        "tokens/s (median)": f"{speed:,.0f}" if speed is not None else "?",
        "MFU (median)": f"{100 * statistics.median(mfu):.1f}%" if mfu else "? (the device's peak is unknown)",
        "final val loss": f"{val[-1]:.4f}" if val else "?",
        "best val loss": f"{min(val):.4f}" if val else "?",
        "final val bits per byte": f"{evals[-1]['val_bpb']:.4f}" if evals and "val_bpb" in evals[-1] else "?",
    }
    if memory:
        summary["peak GPU memory"] = f"{max(memory):.2f} GiB"
    return summary


def wall_seconds(records: list[dict[str, Any]]) -> float:
    """Each process's records (in file order) count time from its own start: the sum of every process's
    last time."""
    total, previous = 0.0, 0.0
    for seconds in (r["time"] for r in records if "time" in r):
        if seconds < previous:  # a new process (a resume) started counting again
            total += previous
        previous = seconds
    return total + previous


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _evaluations(evals: list[dict[str, Any]]) -> list[str]:
    if not evals:
        return ["(none yet)"]
    keys = ["iter", "train_loss", "val_loss", "val_bpb", "hellaswag_acc_norm"]
    keys = [k for k in keys if any(k in r for r in evals)]
    keys += sorted({k for r in evals for k in r if is_suite_score(k)})
    tasks = sorted({k for r in evals for k in r if k.startswith("suite/") and not is_suite_score(k)})
    return _table(keys + tasks, [[_number(r.get(k)) for k in keys + tasks] for r in evals])


def _samples(run_dir: Path, checkpoint: Path | None, count: int, tokens: int, device: torch.device) -> list[str]:
    """The newest samples the run wrote itself, else `count` new ones from `checkpoint` (sample.py's
    defaults: a newline as the prompt, temperature 0.8, top_k 200; a fixed seed)."""
    written = sorted((run_dir / "samples").glob("iter_*.txt"))[-count:] if count else []
    if written:
        return [line for path in written for line in _text_block(path.stem, path.read_text())]
    if not count or checkpoint is None:
        return ["(none)"]
    from hydragpt.config import SampleConfig
    from hydragpt.sampling import Settings, complete, load_model

    model, tokenizer = load_model(load_checkpoint(checkpoint, mmap=True), device)  # weights only on the device
    try:
        prompt = tokenizer.encode(SampleConfig.start)
    except UserError:  # a vocabulary without a newline
        prompt = []
    settings = Settings(tokens, SampleConfig.temperature, SampleConfig.top_k, SampleConfig.top_p, [], True)
    generator = torch.Generator(device).manual_seed(SampleConfig.seed)
    texts = complete(model, tokenizer, [prompt or [0]] * count, settings, generator, torch.float32)
    return [line for n, text in enumerate(texts, start=1) for line in _text_block(f"sample {n}", text)]


def _text_block(title: str, text: str) -> list[str]:
    return [f"{title}:", "", "```", text.strip("\n"), "```", ""]


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


# --- a sweep ------------------------------------------------------------------------------------------


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_MARKER).is_file() or (path / "summary.csv").is_file()


def write_sweep_report(sweep_dir: Path) -> Path:
    """`<sweep_dir>/report.md`: every job side by side (what it changed, how it ended, how fast, how
    well), the val loss curves of all, and a link to each job's own report."""
    from hydragpt.plot import plot_sweep
    from hydragpt.sweep import sweep_rows

    rows = sweep_rows(sweep_dir)
    if not rows:
        raise UserError(f"{sweep_dir} holds no sweep jobs", "give the multirun/<date>/<time> directory of a sweep")
    header = ["job", "overrides", "status", "parameters", "tokens", "wall time", "tokens/s", "MFU"]
    header += ["final val loss", "best val loss", "final val bpb", "report"]
    table = []
    for row in rows:
        job_dir = sweep_dir / str(row["job"])
        records = read_metrics(job_dir) if (job_dir / METRICS_FILE).is_file() else []
        checkpoint = _newest_checkpoint(job_dir)
        reached = load_checkpoint(checkpoint, mmap=True, require=("step",))["step"] if checkpoint else None
        summary = _summary(_sessions(job_dir), records, reached) if records else {}
        report = (
            f"[{row['job']}/{REPORT_FILE}]({row['job']}/{REPORT_FILE})" if (job_dir / REPORT_FILE).is_file() else ""
        )
        table.append(
            [row["job"], row["overrides"] or "(none)", row["status"]]
            + [summary.get(k, "") for k in ("parameters", "tokens", "wall time", "tokens/s (median)", "MFU (median)")]
            + [_number(row.get("final_val_loss")), _number(row.get("best_val_loss")), _number(row.get("final_val_bpb"))]
            + [report]
        )
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} jobs.", "", *_table(header, table), ""]
    lines += ["## Val loss", "", f"![every job's val loss]({plot_sweep(sweep_dir).name})", ""]
    out = sweep_dir / REPORT_FILE
    out.write_text("\n".join(lines))
    return out
