"""`stagediff gate`: the CI regression gate over the pipeline's metrics files.

Each check in `gate.checks` names one metric as `<file>:<key>` (`metrics/<file>.json`,
nested keys joined by dots), which way is better, optional absolute thresholds, and the
regression allowed against a baseline (`dvc metrics diff` semantics: old vs new value
per key). The baseline is the same files at a git revision (default `HEAD`: the
committed metrics) or in a directory. Prints one table; exits 1 on any failure.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stagediff.config import Config, flatten
from stagediff.errors import DataError
from stagediff.layout import METRICS_DIR
from stagediff.sections import GateCheck


@dataclass(frozen=True)
class Outcome:
    """One check's result: a row of the gate's table."""

    metric: str
    value: float | None
    baseline: float | None
    passed: bool
    reason: str


def as_number(value) -> float | None:
    """JSON value as a float (true/false count as 1/0); None when it is not a number."""
    return float(value) if isinstance(value, (int, float)) else None  # bool is an int


def parse_metrics(text: str, source: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object of metrics; got {type(data).__name__}")
    return flatten(data)


class MetricsSource:
    """Metrics files of the workspace, a directory, or a git revision; each read once."""

    def __init__(self, directory: Path | None = None, rev: str | None = None):
        self.directory, self.rev = directory, rev
        self._files: dict[str, dict | None] = {}

    def _read(self, stem: str) -> dict | None:
        if self.rev is None:
            path = self.directory / f"{stem}.json"
            return parse_metrics(path.read_text(), str(path)) if path.is_file() else None
        spec = f"{self.rev}:{(METRICS_DIR / f'{stem}.json').as_posix()}"
        done = subprocess.run(["git", "show", spec], capture_output=True, text=True)
        return parse_metrics(done.stdout, spec) if done.returncode == 0 else None

    def file(self, stem: str) -> dict | None:
        if stem not in self._files:
            self._files[stem] = self._read(stem)
        return self._files[stem]


def baseline_source(baseline: str | None) -> MetricsSource | None:
    """A directory of metrics files if `baseline` names one, else a git revision."""
    if baseline is None:
        return None
    if Path(baseline).is_dir():
        return MetricsSource(directory=Path(baseline))
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DataError(f"gate.baseline {baseline!r}: expected a directory of metrics files or a git revision "
                        f"of this repository; it is neither")
    return MetricsSource(rev=baseline)


def lookup(source: MetricsSource, check: GateCheck) -> tuple[float | None, str | None]:
    """(value, problem): the metric's number, or why there is none."""
    stem, key = check.metric.split(":", 1)
    metrics = source.file(stem)
    if metrics is None:
        return None, f"metrics/{stem}.json missing"
    if key not in metrics:
        return None, f"key {key!r} not in metrics/{stem}.json"
    value = as_number(metrics[key])
    if value is None:
        return None, f"{key} is {metrics[key]!r}, not a number"
    return value, None


def regression(check: GateCheck, value: float, old: float) -> float:
    """How much worse `value` is than `old` (positive: worse), in the check's direction."""
    return old - value if check.better == "higher" else value - old


def judge(check: GateCheck, value: float | None, problem: str | None, old: float | None) -> Outcome:
    failures = []
    if problem:
        failures.append(problem)
    elif math.isnan(value):
        if old is not None and not math.isnan(old):
            failures.append(f"NaN (baseline {old:.4g})")
        elif check.min is not None or check.max is not None:
            failures.append("NaN against a threshold")
    else:
        if check.min is not None and value < check.min:
            failures.append(f"below min {check.min:g}")
        if check.max is not None and value > check.max:
            failures.append(f"above max {check.max:g}")
        if check.tolerance is not None and old is not None and not math.isnan(old):
            worse = regression(check, value, old)
            if worse > check.tolerance + 1e-12:
                failures.append(f"regressed by {worse:.4g} > tolerance {check.tolerance:g}")
    return Outcome(check.metric, value, old, not failures, "; ".join(failures) or "ok")


def run_gate(cfg: Config, metrics_dir: Path = METRICS_DIR, baseline: str | None = None) -> list[Outcome]:
    """Every check of `cfg.gate` on the metrics in `metrics_dir` against the baseline."""
    current = MetricsSource(directory=Path(metrics_dir))
    base = baseline_source(baseline if baseline is not None else cfg.gate.baseline)
    outcomes = []
    for check in cfg.gate.checks:
        value, problem = lookup(current, check)
        old = lookup(base, check)[0] if base is not None else None  # None: new since the baseline
        outcomes.append(judge(check, value, problem, old))
    return outcomes


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def bounds(check: GateCheck) -> str:
    parts = [f">= {check.min:g}" if check.min is not None else "", f"<= {check.max:g}" if check.max is not None else "",
             f"±{check.tolerance:g} ({check.better})" if check.tolerance is not None else ""]
    return " ".join(p for p in parts if p)


def table(cfg: Config, outcomes: list[Outcome]) -> str:
    """The gate's verdict, one row per check, aligned for a terminal or a CI log."""
    rows = [("metric", "value", "baseline", "allowed", "status")]
    for check, o in zip(cfg.gate.checks, outcomes):
        rows.append((o.metric, _fmt(o.value), _fmt(o.baseline), bounds(check),
                     "PASS" if o.passed else f"FAIL: {o.reason}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    failed = sum(not o.passed for o in outcomes)
    lines.append(f"gate: {len(outcomes) - failed} of {len(outcomes)} checks passed"
                 + (f"; {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def run(cfg: Config, metrics_dir: Path = METRICS_DIR, baseline: str | None = None) -> int:
    """Print the gate's table; the exit status is 1 when any check failed."""
    outcomes = run_gate(cfg, metrics_dir, baseline)
    print(table(cfg, outcomes))
    return 0 if all(o.passed for o in outcomes) else 1
