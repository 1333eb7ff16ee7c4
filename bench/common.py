"""Shared pieces of the benchmark suite: statistics, the machine's description, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BUILD = REPO / "build" / "bench"
DEFAULT_IMAGE = REPO / "build" / "images" / "busybox"


def summarize(values: Sequence[float], unit: str, *, p99: bool = False) -> dict[str, Any]:
    """Median, p90 (and p99 if asked), min, max and count of `values`."""
    data = sorted(float(v) for v in values)
    if not data:
        return {"unit": unit, "n": 0}
    out: dict[str, Any] = {
        "unit": unit,
        "n": len(data),
        "median": statistics.median(data),
        "p10": percentile(data, 10),
        "p90": percentile(data, 90),
        "min": data[0],
        "max": data[-1],
    }
    if p99:
        out["p99"] = percentile(data, 99)
    return out


def percentile(sorted_data: Sequence[float], pct: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if len(sorted_data) == 1:
        return sorted_data[0]
    rank = (len(sorted_data) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_data) - 1)
    return sorted_data[low] + (sorted_data[high] - sorted_data[low]) * (rank - low)


@dataclass
class Ratio:
    """A measured ratio next to its target. `higher_is_better` flips the comparison."""

    name: str
    value: float | None
    target: float
    higher_is_better: bool = False
    note: str = ""
    unit: str = "x"

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        u = self.unit if self.unit == "x" else f" {self.unit}"
        if self.higher_is_better:
            if self.value >= self.target:
                return "met"
            short = (1 - self.value / self.target) * 100
            return f"missed: {self.value:.2f}{u} < {self.target:g}{u} ({short:.0f}% short)"
        if self.value <= self.target:
            return "met"
        over = (self.value / self.target - 1) * 100
        return f"missed: {self.value:.2f}{u} > {self.target:g}{u} (over by {over:.0f}%)"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "unit": self.unit,
            "verdict": self.verdict(),
            "note": self.note,
        }


@dataclass
class Figure:
    """The result of one figure: named metrics (each a `summarize` dict), ratios to targets."""

    name: str
    title: str
    status: str = "ok"
    reason: str = ""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    loadavg: tuple[float, float, float] | None = None

    def add(self, key: str, values: Sequence[float], unit: str, *, p99: bool = False) -> dict[str, Any]:
        summary = summarize(values, unit, p99=p99)
        self.metrics[key] = summary
        return summary

    def median(self, key: str) -> float | None:
        metric = self.metrics.get(key)
        return None if not metric or not metric.get("n") else float(metric["median"])

    def not_available(self, reason: str) -> Figure:
        self.status = "not available"
        self.reason = reason
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "metrics": self.metrics,
            "ratios": [r.to_json() for r in self.ratios],
            "notes": self.notes,
            "extra": self.extra,
            "seconds": round(self.seconds, 1),
            "loadavg_after": self.loadavg,
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def read_text(path: Path | str, default: str = "") -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return default


def cpu_model() -> str:
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command_output(argv: Iterable[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit_info() -> dict[str, Any]:
    """The commit and whether the work tree differs from it (read-only git calls)."""
    commit = command_output(["git", "rev-parse", "HEAD"], cwd=REPO)
    status = command_output(["git", "--no-optional-locks", "status", "--porcelain"], cwd=REPO)
    return {"commit": commit or "unknown", "dirty": bool(status)}


def machine_info() -> dict[str, Any]:
    qemu = command_output(["qemu-system-x86_64", "--version"]).splitlines()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "unknown",
    }


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def fmt(value: float | None, unit: str = "") -> str:
    """A number for a table: few significant digits, unit appended."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_markdown(results: dict[str, Any]) -> str:
    """The results table: one row per metric, then the targets."""
    meta = results["meta"]
    lines = [
        "# boxlite benchmark results",
        "",
        f"- commit `{meta['commit'][:12]}`{' (work tree modified)' if meta['dirty'] else ''}, {meta['date']}",
        f"- accelerator: **{meta['accelerator']}** ({meta['accelerator_reason']})",
        f"- host: {meta['cpu_model']}, {meta['cores']} cores, {meta['memory_gib']} GiB; {meta['qemu']}",
        f"- guest kernel: {meta['guest_kernel']}",
        f"- load average at start {fmt_load(meta['loadavg_start'])}, at end {fmt_load(meta['loadavg_end'])}"
        f" (other builds and VMs share this machine); suite took {meta['duration_s']:.0f} s",
        f"- command: `{meta['command']}`",
        "",
        "| figure | measure | median | p90 | min | max | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, fig in results["figures"].items():
        if fig["status"] != "ok":
            lines.append(f"| {name} | {fig['status']}: {fig['reason']} | | | | | |")
            continue
        for key, m in fig["metrics"].items():
            if not m.get("n"):
                continue
            unit = m["unit"]
            p90 = fmt(m["p90"], unit)
            if "p99" in m:
                p90 = f"{p90} (p99 {fmt(m['p99'], unit)})"
            lines.append(
                f"| {name} | {key} | {fmt(m['median'], unit)} | {p90} | {fmt(m['min'], unit)} | "
                f"{fmt(m['max'], unit)} | {m['n']} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "| figure | ratio | measured | target | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, fig in results["figures"].items():
        for r in fig["ratios"]:
            unit = r.get("unit", "x")
            unit = unit if unit == "x" else f" {unit}"
            goal = f">= {r['target']:g}{unit}" if r["higher_is_better"] else f"<= {r['target']:g}{unit}"
            value = "-" if r["value"] is None else f"{r['value']:.2f}{unit}"
            note = f" ({r['note']})" if r["note"] else ""
            lines.append(f"| {name} | {r['name']}{note} | {value} | {goal} | {r['verdict']} |")
    notes = [(name, n) for name, fig in results["figures"].items() for n in fig["notes"]]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{name}**: {n}" for name, n in notes]
    return "\n".join(lines) + "\n"


def fmt_load(load: Sequence[float] | None) -> str:
    return "-" if not load else " / ".join(f"{v:.2f}" for v in load)
