"""metrics.csv: the records of metrics.jsonl as a table, for spreadsheets and pandas.

Training and evaluation records share one table (an evaluation row leaves the training columns empty).
The file starts as a copy of metrics.jsonl, so a resumed run's table matches its trimmed metrics; rows
are appended, and the file is rewritten only when a record brings a new column.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from hydragpt.loggers import METRICS_FILE, RunInfo, read_metrics
from hydragpt.registry import option


@option("logger", "csv")
class Csv:
    """A CSV copy of metrics.jsonl for spreadsheets: one row per record."""

    file: str = "metrics.csv"  # file name, relative to the run directory

    def build(self, run: RunInfo) -> CsvLogger:
        return CsvLogger(run.dir / self.file, run.dir)


class CsvLogger:
    def __init__(self, path: Path, run_dir: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
        self._add_columns(rows)
        self._write(rows)

    def log(self, record: dict[str, Any]) -> None:
        if self._add_columns([record]):
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            self._write([*rows, record])
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns).writerow(record)

    def close(self, failed: bool = False) -> None:
        pass

    def _add_columns(self, records: list[dict[str, Any]]) -> bool:
        new = [key for record in records for key in record if key not in self.columns]
        self.columns += list(dict.fromkeys(new))
        return bool(new)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
