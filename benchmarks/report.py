"""Turn a `pytest benchmarks --benchmark-json FILE` result into Markdown tables and PNG charts.

    python benchmarks/report.py benchmarks/results/suite_cpu_20261129.json

writes `<stem>.md` beside the JSON (one table per benchmark group: contender, time, ratio to the
group's baseline, fraction of the FLOP floor, peak extra memory) and `<stem>/<group>.png` bar
charts, headed by the device, software versions, date, command and any note stored with the
run; cases the run skipped are listed with their reasons (the GPU-only ones are pending there).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict, defaultdict
from pathlib import Path

# the contender each group's "× baseline" column divides by (the path a user has without us)
BASELINES = {"cross-entropy": "eager", "lora-linear": "peft", "train-step": "authors"}


def case_ms(bench: dict) -> float:
    """Device time where the run measured it (CUDA events on a GPU), else the wall-clock median."""
    info = bench.get("extra_info", {})
    return float(info.get("ms", bench["stats"]["median"] * 1e3))


def group_rows(data: dict) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for bench in data["benchmarks"]:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    return groups


def _fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def group_table(benches: list[dict]) -> list[str]:
    op = benches[0]["extra_info"].get("op", "")
    baseline = next((b for b in benches if b["extra_info"].get("contender") == BASELINES.get(op)), None)
    base_ms = case_ms(baseline) if baseline else None
    lines = [f"| contender | ms (median) | IQR ms | rounds | × {BASELINES.get(op, 'baseline')} | "
             "floor fraction | GFLOP/s | peak extra MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for bench in sorted(benches, key=case_ms):
        info, stats = bench["extra_info"], bench["stats"]
        ms = case_ms(bench)
        ratio = _fmt(ms / base_ms if base_ms else None, ".2f")
        gflops = None if info.get("achieved_tflops") is None else info["achieved_tflops"] * 1e3
        mib = None if info.get("peak_extra_mib") is None else max(0.0, info["peak_extra_mib"])
        lines.append(f"| {info.get('contender', bench['name'])} | {ms:.1f} | {stats['iqr'] * 1e3:.1f} | "
                     f"{stats['rounds']} | {ratio} | {_fmt(info.get('floor_fraction'), '.2f')} | "
                     f"{_fmt(gflops, '.1f')} | {_fmt(mib, '.0f', 'n/a')} |")
    floor = benches[0]["extra_info"]
    if "floor_ms" in floor:
        lines.append("")
        lines.append(f"Floor: {floor['floor_what']}, {floor['floor_flops'] / 1e9:.1f} GFLOP, "
                     f"{floor['floor_ms']:.1f} ms measured alone on this device.")
    return lines


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def bar_chart(group: str, benches: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted(benches, key=case_ms)
    names = [b["extra_info"].get("contender", b["name"]) for b in benches]
    times = [case_ms(b) for b in benches]
    errors = [b["stats"]["iqr"] * 1e3 / 2 for b in benches]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(benches) + 1.6))
    bars = ax.barh(names, times, xerr=errors, color=["#2a7ab9" if n.startswith("fastmem") else "#999999" for n in names])
    for bar, bench, err in zip(bars, benches, errors):
        mib = bench["extra_info"].get("peak_extra_mib")
        if mib is not None:
            ax.text(bar.get_width() + err, bar.get_y() + bar.get_height() / 2, f"  +{max(0.0, mib):.0f} MiB",
                    va="center", fontsize=8)
    floor_ms = benches[0]["extra_info"].get("floor_ms")
    if floor_ms:
        ax.axvline(floor_ms, color="#c0392b", linestyle="--", linewidth=1, label="GEMM floor (measured)")
        ax.legend(loc="best", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median; bar = IQR)")
    ax.set_title(f"{group}\n{device}", fontsize=9)
    ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(json_path: Path) -> tuple[Path, list[Path]]:
    data = json.loads(json_path.read_text())
    machine = data.get("machine_info", {})
    ours = machine.get("fastmem", {})
    run = data.get("fastmem_run") or ours  # runs before the split kept these in machine_info
    device = ours.get("device") or machine.get("cpu", {}).get("brand_raw", "unknown device")
    commit = data.get("commit_info", {})
    stem = json_path.with_suffix("")
    charts_dir = stem
    charts_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# fastmem benchmark suite — {json_path.name}", "",
             f"- date: {data.get('datetime', '?')}",
             f"- device: {device}",
             f"- versions: {json.dumps(ours.get('versions', {}))}",
             f"- commit: {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''} on {commit.get('branch', '?')}",
             f"- command: `{run.get('command', '?')}`"]
    if run.get("load_average_at_start"):
        lines.append(f"- load average at start (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in run['load_average_at_start'])}")
    if run.get("note"):
        lines.append(f"- note: **{run['note']}**")
    lines += ["", "Time is forward + backward (+ optimizer step for train-step) per call: wall clock on a CPU, "
              "CUDA events (triton.testing.do_bench) on a GPU. Floor fraction = time of the case's unavoidable "
              "GEMMs alone / time of the case (1.0 = at the floor). Peak extra memory is above the inputs "
              "(CPU: RSS high-water mark; GPU: max_memory_allocated).", ""]
    charts = []
    for group, benches in group_rows(data).items():
        chart = charts_dir / f"{slug(group)}.png"
        bar_chart(group, benches, chart, device)
        charts.append(chart)
        lines += [f"## {group}", "", *group_table(benches), "", f"![{group}]({charts_dir.name}/{chart.name})", ""]
    skipped = data.get("fastmem_skipped", [])
    if skipped:
        by_reason = defaultdict(list)
        for entry in skipped:
            by_reason[entry["reason"]].append(entry["case"])
        lines += ["## Not run here (pending or not installed)", "", "| reason | cases |", "|---|---|"]
        for reason, cases in sorted(by_reason.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(f"`{c}`" for c in cases[:6]) + (f" … (+{len(cases) - 6})" if len(cases) > 6 else "")
            lines.append(f"| {reason} ({len(cases)}) | {shown} |")
        lines.append("")
    md_path = json_path.with_suffix(".md")
    md_path.write_text("\n".join(lines))
    return md_path, charts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON file(s)")
    args = parser.parse_args(argv)
    for path in args.json:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        md_path, charts = render(path)
        print(f"wrote {md_path} and {len(charts)} chart(s) in {md_path.with_suffix('')}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
