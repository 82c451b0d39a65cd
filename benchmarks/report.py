"""Turn a pytest-benchmark JSON into a markdown table and a PNG chart.

    pytest benchmarks/ --benchmark-json=RESULTS.json
    python -m benchmarks.report RESULTS.json [--markdown report.md] [--png speedups.png]

Every benchmark records its provider and case in ``extra_info``; rows are grouped by case
(everything but the provider) and each provider is shown as a ratio to the baseline measured
in the same run (``reference``; ``stock`` for encoding, ``matmul`` for recall, ``sdpa`` for the
attention core, ``torch-cpu`` for ONNX Runtime, whose rows also carry their parity with
PyTorch: max abs, min cosine), and its extra memory as a ratio to the baseline's.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

BASELINES = ("reference", "stock", "matmul", "torch-cpu", "sdpa")
# what each op is judged against (the targets): encoding against stock open_clip, recall
# against the bare GEMM that scores it, the attention core against fused SDPA; else the reference
OP_BASELINE = {"encode": "stock", "recall": "matmul", "attention_core": "sdpa"}
# bars below 1x against these are expected (the baseline does less work): not regressions
FLOORS = {"stock", "matmul"}
_SKIP = {"provider", "median_ms", "q1_ms", "q3_ms", "peak_mem_mb", "extra_mem_mb", "device", "speedup", "baseline",
         "max_abs", "min_cosine", "extra_mem_ratio"}


def load(path: Path) -> Tuple[Dict, List[Dict]]:
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "provider" not in info or "median_ms" not in info:
            continue
        info["name"] = bench["name"]
        rows.append(info)
    if not rows:
        raise ValueError(f"{path} holds no harma_fast benchmark records "
                         "(run `pytest benchmarks/ --benchmark-json=...`)")
    return data, rows


def _case(row: Dict) -> Tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in _SKIP and k != "name"
                        and not k.endswith("_per_s")))


def _rate(row: Dict) -> str:
    for key, value in row.items():
        if key.endswith("_per_s"):
            return f"{value:,.0f} {key[:-6]}/s"
    return ""


def speedups(rows: List[Dict]) -> List[Dict]:
    """Rows with ``speedup`` = baseline median / this median, within each case."""
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for row in rows:
        groups[_case(row)].append(row)
    out = []
    for members in groups.values():
        wanted = OP_BASELINE.get(members[0].get("op"))
        order = ((wanted,) if wanted else ()) + BASELINES
        base = next((m for b in order for m in members if m["provider"] == b), None)
        for m in members:
            m = dict(m)
            m["speedup"] = base["median_ms"] / m["median_ms"] if base and m["median_ms"] > 0 else None
            m["baseline"] = base["provider"] if base else None
            extra, base_extra = m.get("extra_mem_mb"), (base or {}).get("extra_mem_mb")
            m["extra_mem_ratio"] = extra / base_extra if extra is not None and base_extra else None
            out.append(m)
    return sorted(out, key=lambda r: (r.get("op", ""), str(_case(r)), r["provider"]))


def markdown(data: Dict, rows: List[Dict]) -> str:
    machine = data.get("machine_info", {})
    device = rows[0].get("device", "?")
    head = [f"- device: {device}", f"- date: {data.get('datetime', '?')}",
            f"- python {machine.get('python_version', '?')}, {machine.get('cpu', {}).get('brand_raw', '')}"]
    lines = head + ["", "peak MiB: all device memory at the call's peak; extra: what the call added to what was "
                        "allocated before it (and its ratio to the baseline's extra)", "",
                    "| op | case | provider | median ms (IQR) | throughput | peak MiB | extra MiB | vs baseline | "
                    "parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in speedups(rows):
        case = ", ".join(f"{k}={v}" for k, v in _case(r) if k != "op")
        iqr = f"{r['median_ms']:.3f} ({r['q1_ms']:.3f}–{r['q3_ms']:.3f})"
        mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "–"
        extra = f"{r['extra_mem_mb']:.0f}" if r.get("extra_mem_mb") is not None else "–"
        if r.get("extra_mem_ratio") is not None and r["provider"] != r["baseline"]:
            extra += f" ({r['extra_mem_ratio']:.3f}x)"
        ratio = f"{r['speedup']:.2f}x {r['baseline']}" if r["speedup"] is not None else "–"
        parity = f"{r['max_abs']:.1e}, cos {r['min_cosine']:.5f}" if "min_cosine" in r else "–"
        lines.append(f"| {r.get('op', '')} | {case} | {r['provider']} | {iqr} | {_rate(r)} | {mem} | {extra} | "
                     f"{ratio} | {parity} |")
    return "\n".join(lines) + "\n"


def chart(rows: List[Dict], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter

    picked = [r for r in speedups(rows) if r["speedup"] is not None and r["provider"] != r["baseline"]]
    if not picked:
        return
    labels = [f"{r.get('op', '')}: {r['provider']} vs {r['baseline']}\n" +
              ", ".join(f"{v}" for k, v in _case(r) if k != "op") for r in picked]
    values = [r["speedup"] for r in picked]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.38 * len(picked))))
    # slower than the reference stands out (a regression to look at); against a floor that does
    # less work (stock open_clip, the bare GEMM) below 1x is expected and drawn grey
    colours = ["#9aa5b1" if r["baseline"] in FLOORS else "#3b7dd8" if v >= 1 else "#d8643b"
               for r, v in zip(picked, values)]
    ax.barh(range(len(picked)), values, color=colours)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    low, high = min(values + [1.0]) / 1.15, max(values + [1.0]) * 1.3  # room for the labels
    ax.set_xlim(low, high)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=6)
    ax.set_yticks(range(len(picked)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the baseline of the same run (x)")
    ax.set_title("\n".join(textwrap.wrap(str(picked[0].get("device", "")), 90)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON")
    parser.add_argument("--markdown", type=Path, help="write the table here (default: print it)")
    parser.add_argument("--png", type=Path, help="chart of the speed-ups (default: beside the JSON)")
    args = parser.parse_args(argv)
    try:
        data, rows = load(args.results)
    except (OSError, ValueError) as err:  # a missing, non-JSON or empty results file: one line, not a traceback
        parser.error(f"{args.results}: {err.strerror if isinstance(err, OSError) and err.strerror else err}")
    text = markdown(data, rows)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    chart(rows, args.png or args.results.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
