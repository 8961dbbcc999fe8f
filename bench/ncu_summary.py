"""The counters that say what holds each kernel, as a table, from Nsight Compute's raw page.

    ncu --import OUT/path.ncu-rep --page raw --csv > OUT/ncu_raw.csv   (bench/run_all.sh ncu does it)
    python3 bench/ncu_summary.py OUT/ncu_raw.csv [--kernels _up_kernel,_down_kernel,nvjet]

One row per profiled kernel (in launch order; ``--kernels`` keeps those whose name starts with
one of the prefixes): its time, the SM clock it ran at, how busy the tensor pipe, the L2 (and the
fabric between the L2's two halves), and DRAM were, the L2 hit rate and the bytes read from DRAM.
Units are normalised (ms, GHz, GB); a metric the report lacks shows as "-". Runs without a GPU.
"""

import argparse
import csv
import io
import sys

# (column, metric, unit it is shown in)
COLUMNS = (
    ("ms", "gpu__time_duration.sum", "ms"),
    ("SM GHz", "gpc__cycles_elapsed.avg.per_second", "GHz"),
    (
        "tensor pipe %",
        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
        "%",
    ),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("L2 fabric %", "lts__ltcfabric2ltc_cycles_active.avg.pct_of_peak_sustained_elapsed", "%"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct", "%"),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("DRAM read GB", "dram__bytes_read.sum", "GB"),
)
# ncu's unit prefixes, per unit shown
SCALES = {
    "ms": {
        "ns": 1e-6,
        "nsecond": 1e-6,
        "us": 1e-3,
        "usecond": 1e-3,
        "ms": 1,
        "msecond": 1,
        "s": 1e3,
    },
    "GHz": {"hz": 1e-9, "khz": 1e-6, "mhz": 1e-3, "ghz": 1},
    "GB": {"byte": 1e-9, "kbyte": 1e-6, "mbyte": 1e-3, "gbyte": 1, "tbyte": 1e3},
    "%": {"%": 1},
}


def _value(text: str, unit: str, shown: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    scale = SCALES[shown].get(unit.strip().lower())
    return None if scale is None else value * scale


def summary(raw_csv: str, kernels: tuple[str, ...] = ()) -> str:
    """The markdown table of ``raw_csv`` (the text of ``ncu --page raw --csv``)."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    lines = [
        "| # | kernel | grid | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in data:
        name = row[col["Kernel Name"]]
        if kernels and not name.startswith(kernels):
            continue
        cells = []
        for _, metric, shown in COLUMNS:
            i = col.get(metric)
            value = None if i is None else _value(row[i], units[i], shown)
            cells.append(
                "-" if value is None else f"{value:.3f}" if shown != "%" else f"{value:.0f}"
            )
        grid = row[col["Grid Size"]] if "Grid Size" in col else "-"
        lines.append(f"| {row[col['ID']]} | {name[:40]} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw_csv")
    ap.add_argument("--kernels", default="", help="comma-separated kernel name prefixes")
    args = ap.parse_args()
    with open(args.raw_csv, newline="") as f:
        text = f.read()
    prefixes = tuple(p for p in args.kernels.split(",") if p)
    sys.stdout.write(summary(text, prefixes) + "\n")


if __name__ == "__main__":
    main()
