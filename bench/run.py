"""boxlite's benchmark suite. No pass/fail: it measures, next to a baseline from the same run.

    python bench/run.py                      # every figure (about 5-8 minutes here)
    python bench/run.py --only warm_exec     # one figure (comma-separate several)
    python bench/run.py --quick              # few runs of each, for a smoke test
    make bench [FIGURE=warm_exec]            # builds what it needs first

Writes bench/results/latest.json and bench/results/latest.md (see docs/benchmarks.md). A run
of some figures only keeps the other figures' latest results from the previous file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# bench/ for its own modules, the repository root for the test kit (testkit/).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common
import figures

RESULTS = common.BENCH / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated figures: " + ", ".join(figures.FIGURES))
    parser.add_argument("--image", type=Path, default=common.DEFAULT_IMAGE, help="OCI layout of the demo image")
    parser.add_argument("--quick", action="store_true", help="few runs per figure (smoke test, noisy numbers)")
    parser.add_argument("--stream-mib", type=int, default=256, help="bytes streamed in the streaming figure")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json and latest.md")
    parser.add_argument("--keep", action="store_true", help="keep the runtime homes (for looking at console logs)")
    return parser.parse_args(argv)


def selected(only: str) -> list[str]:
    if not only:
        return list(figures.FIGURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in figures.FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {', '.join(figures.FIGURES)}")
    return names


async def run(args: argparse.Namespace) -> dict:
    names = selected(args.only)
    if not (args.image / "index.json").is_file():
        raise SystemExit(f"{args.image} is not an OCI layout: run `make image` first")
    tmp = Path(tempfile.mkdtemp(prefix="boxlite-bench-"))
    started = time.monotonic()
    load_start = os.getloadavg()
    ctx = figures.Ctx(args.image.resolve(), args.quick, args.stream_mib, tmp)
    print(f"accelerator: {ctx.accel} ({ctx.accel_reason}); load average {common.fmt_load(load_start)}", flush=True)
    try:
        for name in names:
            if name == "boot_floor" and "cold_create" in names:
                continue  # measured interleaved with the cold creates
            t0 = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                produced = await figures.FIGURES[name](ctx)
            except Exception as e:
                traceback.print_exc()
                failed = common.Figure(name, name)
                failed.status, failed.reason = "error", f"{type(e).__name__}: {e}"
                produced = [failed]
            for fig in produced:
                fig.seconds = time.monotonic() - t0
                fig.loadavg = os.getloadavg()
                ctx.results[fig.name] = fig
                print_figure(fig)
    finally:
        if args.keep:
            print(f"runtime homes kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        **common.commit_info(),
        "date": common.now_iso(),
        **common.machine_info(),
        "accelerator": ctx.accel,
        "accelerator_reason": ctx.accel_reason,
        "guest_kernel": guest_kernel(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "duration_s": time.monotonic() - started,
        "quick": args.quick,
        "command": "python bench/run.py"
        + (f" --only {args.only}" if args.only else "")
        + (" --quick" if args.quick else ""),
        "product_argv": ctx.product_argv,
    }
    previous = load_previous(args.out / "latest.json") if args.only else {}
    figs = {name: fig for name, fig in previous.items() if name not in ctx.results}
    figs.update({name: fig.to_json() for name, fig in ctx.results.items()})
    order = ["boot_floor", "cold_create", "warm_exec", "streaming", "concurrency", "memory", "image_pull"]
    order += ["image_unpack", "stop_restart", "net_download", "net_connect", "net_boot_cost"]
    figs = dict(sorted(figs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    return {"meta": meta, "figures": figs}


def guest_kernel() -> str:
    manifest = figures.engine.guest_dir() / "manifest.json"
    try:
        kernel = json.loads(manifest.read_text()).get("kernel", {})
        return f"{kernel.get('package', '?')} {kernel.get('version', '?')}"
    except (OSError, ValueError):
        return "unknown"


def load_previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("figures", {})
    except (OSError, ValueError):
        return {}


def print_figure(fig: common.Figure) -> None:
    if fig.status != "ok":
        print(f"  {fig.name}: {fig.status}: {fig.reason}", flush=True)
        return
    for key, m in fig.metrics.items():
        if m.get("n"):
            p99 = f" p99 {common.fmt(m['p99'])}" if "p99" in m else ""
            print(
                f"  {fig.name}.{key}: median {common.fmt(m['median'])} p90 {common.fmt(m['p90'])}{p99} "
                f"[{common.fmt(m['min'])}..{common.fmt(m['max'])}] {m['unit']} n={m['n']}",
                flush=True,
            )
    for r in fig.ratios:
        value = "-" if r.value is None else f"{r.value:.2f}"
        print(f"  {fig.name}: {r.name} = {value} ({r.verdict()})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "latest.json", results)
    (args.out / "latest.md").write_text(common.render_markdown(results))
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'} in {results['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
