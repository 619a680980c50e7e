#!/usr/bin/env python
"""The mode matrix (variant x resolution x mode) assembled from the stored `bench_transformer.py` results.

    python bench/matrix.py                      # reads bench/results/*.json, prints a markdown table
    python bench/matrix.py --results DIR --json matrix.json

Each cell is the newest measurement of that (variant, resolution, mode) that has a baseline in the same file, else
the newest one (files are ordered by name, which starts with the date). Its ratio is taken against the `baseline`
row of that SAME file (same card, same run, same weights and inputs), never against a number from another run; a
cell whose file has no baseline shows no ratio. The `default`
mode is the package's default path, which today is the baseline path, so it shares the baseline column. Rows
measured on fewer blocks than the model has (`bench_transformer.py --layers`) are ratio measurements, not
whole-model times: they stay out of the matrix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS


MODE_COLUMNS = ("baseline", "compile", "fp8_weight_only", "fp8_dynamic", "group", "low_vram", "original")
VARIANTS = ("reference", "extension", "avatar")
RESOLUTIONS = ("480P", "720P")
BASELINE_MODES = ("baseline", "default")  # the package's default path is the baseline path today


def _full_layers(row: dict) -> int | None:
    """The block count of the real transformer a row measured (rows without `layers` are whole models)."""
    return TRANSFORMER_CONFIGS.get(row["variant"], {}).get("num_layers")


def transformer_rows(path: Path) -> list[dict]:
    """The forward-timing rows of one result file (`{"env", "rows"}` from bench_transformer.py); [] for others."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    rows = data.get("rows", []) if isinstance(data, dict) else []
    return [
        r
        for r in rows
        if {"variant", "resolution", "mode", "median_ms"} <= set(r) and r.get("layers") in (None, _full_layers(r))
    ]


def collect(results: Path) -> dict[tuple[str, str, str], dict]:
    """(variant, resolution, mode) -> {ms, peak_gib, rel_error, vs_baseline, file}: the newest measurement with a
    same-run baseline wins over any without one, then the newer file wins."""
    cells: dict[tuple[str, str, str], dict] = {}
    for path in sorted(results.glob("*.json")):
        rows = transformer_rows(path)
        baselines = {(r["variant"], r["resolution"]): r["median_ms"] for r in rows if r["mode"] in BASELINE_MODES}
        for r in rows:
            mode = "baseline" if r["mode"] in BASELINE_MODES else r["mode"]
            base = baselines.get((r["variant"], r["resolution"]))
            key = (r["variant"], r["resolution"], mode)
            if base is None and cells.get(key, {}).get("vs_baseline"):
                continue
            cells[key] = {
                "ms": r["median_ms"],
                "peak_gib": r.get("peak_gib"),
                "rel_error": r.get("rel_error"),
                "vs_baseline": round(base / r["median_ms"], 3) if base else None,
                "file": path.name,
            }
    return cells


def markdown(cells: dict[tuple[str, str, str], dict]) -> str:
    """One row per variant and resolution; a cell reads `ms (speed-up vs the same run's baseline), peak GiB`."""
    lines = ["| variant | res | " + " | ".join(MODE_COLUMNS) + " |", "|---|---|" + "---|" * len(MODE_COLUMNS)]
    for variant in VARIANTS:
        for resolution in RESOLUTIONS:
            row = []
            for mode in MODE_COLUMNS:
                cell = cells.get((variant, resolution, mode))
                if cell is None:
                    row.append("-")
                    continue
                ratio = f" ({cell['vs_baseline']:.2f}x)" if cell["vs_baseline"] else ""
                peak = f", {cell['peak_gib']:.1f} GiB" if cell["peak_gib"] is not None else ""
                row.append(f"{cell['ms']:,.0f}{ratio}{peak}")
            lines.append(f"| {variant} | {resolution} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--json", type=Path, help="also write the cells here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not args.results.is_dir():
        raise SystemExit(f"--results: {args.results} is not a folder")
    cells = collect(args.results)
    print(markdown(cells))
    if args.json:
        rows = [{"variant": v, "resolution": r, "mode": m, **c} for (v, r, m), c in sorted(cells.items())]
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
