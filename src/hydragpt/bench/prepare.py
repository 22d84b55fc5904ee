"""Data-preparation benchmark: one process against a worker pool on a generated .jsonl corpus.

Runs `scripts/prepare.py data=text` as a user would, alternating worker counts (A B A B, since this
kind of machine is noisy), and reports wall time, MB/s, tokens/s and the peak memory of the whole
process tree (PSS, and the RSS sum that counts shared pages once per process), next to the corpus size.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from hydragpt.bench.memory import last_error, run_measured
from hydragpt.config import BenchPrepareConfig
from hydragpt.errors import UserError

log = logging.getLogger(__name__)
SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def generate_corpus(path: Path, size_mb: int, seed: int) -> None:
    """English-like documents (Zipf-distributed words of a made-up lexicon), one JSON object per line."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ter", "an", "su", "ri", "po", "den", "ve", "tha", "ing", "or", "el"])
    lexicon = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(5000)])
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    tmp = path.with_name(path.name + ".tmp")
    written, target = 0, size_mb * 10**6
    with open(tmp, "w") as f:
        while written < target:
            words = rng.choice(lexicon, size=(200, 300), p=weights)
            lengths = rng.integers(50, 300, size=200)
            lines = "".join(
                json.dumps({"text": " ".join(row[:n]).capitalize() + "."}) + "\n"
                for row, n in zip(words, lengths, strict=True)
            )
            f.write(lines)
            written += len(lines)
    tmp.replace(path)


def bench_prepare(cfg: BenchPrepareConfig) -> str:
    """The comparison table as Markdown."""
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{cfg.size_mb}mb_seed{cfg.seed}.jsonl"
    if not corpus.is_file():
        log.info("generating a %d MB corpus at %s", cfg.size_mb, corpus)
        generate_corpus(corpus, cfg.size_mb, cfg.seed)
    corpus_bytes = corpus.stat().st_size
    rows = []
    for round_ in range(cfg.repeats):
        for workers in cfg.workers:
            name = f"bench_w{workers}"
            command = [
                sys.executable,
                str(SCRIPTS / "prepare.py"),
                "data=text",
                f"data.source={corpus}",
                f"data.name={name}",
                f"data.tokenizer={cfg.tokenizer}",
                f"paths.data_dir={work}",
                f"workers={workers}",
                f"task_mb={cfg.task_mb}",
                "overwrite=true",
            ]
            result, seconds, (pss, rss) = run_measured(command)
            if result.returncode != 0:
                raise UserError(
                    f"data preparation failed: {last_error(result)}",
                    "bench_prepare's tokenizer, workers and task_mb are prepare.py's data.tokenizer, workers, task_mb",
                )
            meta = json.loads((work / name / "meta.json").read_text())
            tokens = sum(meta["tokens"].values())
            rows.append((round_, workers, seconds, corpus_bytes / 1e6 / seconds, tokens / seconds, pss, rss))
            log.info("round %d, %d worker(s): %.1fs, peak PSS %.0f MiB", round_ + 1, workers, seconds, pss / 2**20)
    lines = [
        f"corpus: {corpus_bytes / 1e6:,.0f} MB .jsonl, {tokens:,} {cfg.tokenizer} tokens; task_mb={cfg.task_mb}",
        "",
        "| round | workers | wall s | MB/s | tokens/s | peak PSS, all processes | peak RSS, summed |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r + 1} | {w} | {s:.1f} | {mb:.2f} | {t:,.0f} | {p / 2**20:,.0f} MiB | {q / 2**20:,.0f} MiB |"
        for r, w, s, mb, t, p, q in rows
    ]
    return "\n".join(lines)
