"""latest.json -> latest.md (the table) and latest.png (the plot).

    python -m benchmarks.report benchmarks/results/latest.json

Each system's cell shows its best configuration in that workload: the highest steady-state
rate, or for consumer_bound (where every system is capped by the consumer) the smallest stall
fraction, then the smallest memory.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.systems import SYSTEM_ORDER
from benchmarks.workloads import WORKLOADS

PEERS = ("tf.data", "tf.data-oracle", "torch", "grain")
Record = dict[str, Any]


def si(value: float | None, digits: int = 3) -> str:
    """1234567 -> 1.23M; None -> '-'."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def one_line(r: Record) -> str:
    """A console summary of one record."""
    head = f"{r['system']:<16} {r['config']:<48}"
    if r["status"] != "ok":
        reason = (r.get("error") or "").strip().splitlines()
        return f"{head} {r['status'].upper()}: {reason[-1] if reason else ''}"[:200]
    stall = "" if r["stall_fraction"] is None else f"  stall {pct(r['stall_fraction'])}"
    return (
        f"{head} {si(r['elements_per_s']):>7}/s  e2e {si(r['end_to_end_elements_per_s']):>7}/s"
        f"  rss {r['peak_rss_mib']:.0f} MiB  cpu {r['cpu_s']:.1f} s{stall}"
    )


def best(records: Sequence[Record], workload: str, system: str) -> Record | None:
    ok = [
        r
        for r in records
        if r["workload"] == workload and r["system"] == system and r["status"] == "ok"
    ]
    if not ok:
        return None
    if WORKLOADS[workload].consumer_sleep_s:
        return min(ok, key=lambda r: (round(r["stall_fraction"] or 0, 2), r["peak_rss_mib"]))
    return max(ok, key=lambda r: r["elements_per_s"] or 0)


def _status(records: Sequence[Record], workload: str, system: str) -> str:
    """Why a cell is empty: the statuses of that system's records."""
    statuses = sorted(
        {r["status"] for r in records if r["workload"] == workload and r["system"] == system}
    )
    return "/".join(statuses) if statuses else ""


def cell(r: Record | None) -> str:
    if r is None:
        return "-"
    parts = [
        f"**{si(r['elements_per_s'])}/s**",
        f"{r['peak_rss_mib']:.0f} MiB",
        f"{r['cpu_s']:.1f} cpu-s",
    ]
    if r["stall_fraction"] is not None:
        parts.append(f"stall {pct(r['stall_fraction'])}")
    if r["limit_fraction"] is not None:
        parts.append(f"{pct(r['limit_fraction'])} of limit")
    return "<br>".join(parts)


def summary_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per workload: the best record per system, the limit, and feedline's ratios."""
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in records):
        bests = {s: best(records, workload, s) for s in SYSTEM_ORDER}
        peers = [(s, bests[s]) for s in PEERS if bests[s] is not None]
        top_peer = max(peers, key=lambda p: p[1]["elements_per_s"], default=None)  # type: ignore[index]
        fl, oracle = bests["feedline"], bests["feedline-oracle"]
        limit = next(
            (r["limit_elements_per_s"] for r in records if r["workload"] == workload), None
        )
        rows.append(
            {
                "workload": workload,
                "bests": bests,
                "limit": limit,
                "peer": top_peer[0] if top_peer else None,
                "vs_peer": _ratio(fl, top_peer[1] if top_peer else None),
                "vs_oracle": _ratio(fl, oracle),
            }
        )
    return rows


def _ratio(a: Record | None, b: Record | None) -> float | None:
    if a is None or b is None or not b["elements_per_s"]:
        return None
    return a["elements_per_s"] / b["elements_per_s"]


def markdown(records: Sequence[Record]) -> str:
    if not records:
        return "# feedline benchmarks\n\nNo records.\n"
    machine = records[0]["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    lines = [
        "# feedline benchmarks",
        "",
        f"Mode `{records[0]['mode']}`; {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"{machine['cpu_model']}; Python {machine['python']}; {packages}.",
        "",
        "Every cell is that system's best configuration: steady-state elements/s (after 10% "
        "warm-up), peak RSS of the process tree, CPU seconds of the tree; the stall fraction "
        "where a consumer does work; the fraction of the limit where the work is CPU-bound. "
        "Compare within a row only: absolute numbers on a shared machine are noisy. feedline's "
        "AUTOTUNE runs first and again after the peers (`run=again`), as the machine's speed "
        "drifts within a workload; its cell is the better of the two, as every other cell is "
        "the best of its system's runs.",
        "",
    ]
    header = [*SYSTEM_ORDER, "limit", "feedline / best peer", "AUTOTUNE / oracle"]
    lines.append("| workload | " + " | ".join(header) + " |")
    lines.append("|---" * (len(header) + 1) + "|")
    for row in summary_rows(records):
        cells = [
            cell(row["bests"][s]) if row["bests"][s] else _status(records, row["workload"], s)
            for s in SYSTEM_ORDER
        ]
        vs_peer = f"{row['vs_peer']:.2f}x ({row['peer']})" if row["vs_peer"] else "-"
        vs_oracle = f"{row['vs_oracle']:.2f}x" if row["vs_oracle"] else "-"
        limit = f"{si(row['limit'])}/s" if row["limit"] else "-"
        lines.append(
            f"| {row['workload']} | " + " | ".join([*cells, limit, vs_peer, vs_oracle]) + " |"
        )
    lines += [
        "",
        "## Every configuration",
        "",
        "| workload | system | config | status | el/s | end-to-end el/s | first batch s "
        "| peak RSS MiB | PSS at end MiB | CPU s | stall | of limit | note |",
        "|---" * 13 + "|",
    ]
    for r in records:
        note = (r.get("note") or r.get("error") or "").strip().splitlines()
        lines.append(
            "| "
            + " | ".join(
                [
                    r["workload"],
                    r["system"],
                    f"`{r['config']}`",
                    r["status"],
                    si(r["elements_per_s"]),
                    si(r["end_to_end_elements_per_s"]),
                    _num(r["time_to_first_batch_s"], 3),
                    _num(r["peak_rss_mib"], 0),
                    _num(r["end_pss_mib"], 0),
                    _num(r["cpu_s"], 1),
                    pct(r["stall_fraction"]),
                    pct(r["limit_fraction"]),
                    (note[-1] if note else "").replace("|", "\\|")[:120],
                ]
            )
            + " |"
        )
    lines += ["", "See benchmarks/README.md for what each figure means.", ""]
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(records: Sequence[Record], path: Path) -> bool:
    """Grouped bars per workload: throughput relative to the fastest system, and peak RSS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = summary_rows(records)
    names = [row["workload"] for row in rows]
    systems = [s for s in SYSTEM_ORDER if any(row["bests"][s] for row in rows)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(names) + 3), 8))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs, rates, rss = [], [], []
        for i, row in enumerate(rows):
            r = row["bests"][system]
            fastest = max((b["elements_per_s"] for b in row["bests"].values() if b), default=0)
            if r is not None and fastest:
                xs.append(i + (k - (len(systems) - 1) / 2) * width)
                rates.append(r["elements_per_s"] / fastest)
                rss.append(r["peak_rss_mib"])
        top.bar(xs, rates, width, label=system)
        bottom.bar(xs, rss, width, label=system)
    top.set_ylabel("throughput / fastest in workload")
    top.set_yscale("log")  # systems differ by orders of magnitude (io_latency, overhead)
    top.set_title("Steady-state throughput (best configuration per system)")
    bottom.set_ylabel("peak RSS of process tree (MiB)")
    bottom.set_yscale("log")
    bottom.set_title("Memory")
    for ax in (top, bottom):
        ax.set_xticks(range(len(names)), names)
        ax.grid(axis="y", alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(records: Sequence[Record], md_path: Path, png_path: Path) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(records))
    if not plot(records, png_path):
        print("matplotlib is not installed: no plot")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "json", type=Path, nargs="?", default=Path("benchmarks/results/latest.json")
    )
    args = parser.parse_args(argv)
    records = json.loads(args.json.read_text())
    stem = args.json.parent / args.json.stem
    write(records, stem.with_suffix(".md"), stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
