"""Writing `veil bench`'s results: the Markdown table (also printed), bench.json and bench.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from veil.bench.modes import SEED_GUESSES

# the seed's guesses as slowdown intervals for the chart ("~10000x" drawn as 5000-20000)
GUESS_RANGES = {"plaintext": (1.0, 1.0), "HE": (5e3, 2e4), "FL": (5e3, 2e4), "MPC": (10.0, 100.0),
                "TEE": (1.1, 10.0)}

COLUMNS = ("mode", "accuracy", "agreement", "inference s/sample", "slowdown (inference)", "training s/unit",
           "slowdown (training)", "bytes on wire", "key bytes", "seed's guess")


def seed_guess(mode: str) -> str:
    """The seed's guessed computation slowdown for the technology of `mode` ("" for none)."""
    if mode.startswith("HE") or mode.startswith("FL"):
        return SEED_GUESSES["HE"] + (" (inference)" if mode.startswith("FL") else "")
    for key in ("MPC", "TEE"):
        if mode.startswith(key):
            return SEED_GUESSES[key]
    return SEED_GUESSES["plaintext"] if mode == "plaintext" else ""


def _num(value: float | None, kind: str) -> str:
    if value is None:
        return "not measured" if kind != "bytes" else "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:,.0f}x" if value >= 10 else f"{value:.2g}x"
    if kind == "bytes":
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= size:
                return f"{value / size:.3g} {unit}"
        return f"{int(value)} B"
    return f"{value:.3g}"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each result row as the table's cells (numbers rounded for reading; bench.json keeps them exact)."""
    out = []
    for r in rows:
        unit = f" /{r['training_unit'].split()[0]}" if r["training_unit"] else ""
        out.append([r["mode"], _num(r["accuracy"], "pct"), _num(r["agreement"], "pct"),
                    _num(r["inference_s_per_sample"], "s"), _num(r["inference_slowdown"], "x"),
                    "-" if r["training_s_per_unit"] is None else _num(r["training_s_per_unit"], "s") + unit,
                    "-" if r["training_slowdown"] is None else _num(r["training_slowdown"], "x"),
                    _num(r["bytes_on_wire"], "bytes"), _num(r["key_bytes"], "bytes"), seed_guess(r["mode"])])
    for cells, r in zip(out, rows, strict=True):
        if r["mode"].startswith("TEE"):
            cells[1:9] = ["not measured"] + ["-"] * 7
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: the numbers table, then what each row measures and who sees what."""
    rows = report["rows"]
    lines = [f"`veil bench` on {report['dataset']} ({report['n_train']} train / {report['n_test']} test rows, "
             f"{report['n_features']} features), model {report['model']}, {report['date']}, "
             f"load average {report['load_before']} -> {report['load_after']}, "
             f"{'quick' if report['quick'] else 'full'} run in {report['wall_seconds']:.0f} s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| mode | what it measures | who sees what |", "|---|---|---|"]
    lines += [f"| {r['mode']} | {r['measures']} | {r['threat_model']} |" for r in rows]
    return "\n".join(lines) + "\n"


def terminal_table(report: dict[str, Any]) -> str:
    """The numbers table aligned for a terminal."""
    cells = [list(COLUMNS), *table_rows(report["rows"])]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """bench.png: slowdown against plaintext (inference and training) and bytes on the wire per mode, log axes;
    a mode without a number (TEE) is labelled "not measured"."""
    rows = report["rows"]
    names = [r["mode"] for r in rows]
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ys = range(len(rows))
    for offset, key, label, color in ((-0.2, "inference_slowdown", "inference", "tab:blue"),
                                      (0.2, "training_slowdown", "training", "tab:orange")):
        ax1.barh([y + offset for y in ys], [r[key] or float("nan") for r in rows], height=0.4, label=label, color=color)
    guessed = [(y, GUESS_RANGES[k]) for y, r in zip(ys, rows, strict=True)
               for k in GUESS_RANGES if r["mode"].startswith(k)]
    for i, (y, (lo, hi)) in enumerate(guessed):
        ax1.plot([lo, hi], [y, y], color="black", marker="|", markersize=14, linewidth=2,
                 label="seed's guess" if i == 0 else None)
    ax1.set_xscale("log")
    ax1.set_xlabel("slowdown against plaintext (x, log)")
    ax1.set_yticks(list(ys), names)
    ax1.set_ylim(len(rows) - 0.5, -0.5)
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax1.set_title(f"{report['dataset']}, {report['model']}: time against plaintext")
    ax2.barh(list(ys), [r["bytes_on_wire"] or float("nan") for r in rows], color="tab:green")
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes on the wire for the measured run (log)")
    ax2.set_yticks(list(ys), names)
    ax2.set_ylim(len(rows) - 0.5, -0.5)
    ax2.set_title("bytes on the wire")
    for y, r in zip(ys, rows, strict=True):
        measured = r["accuracy"] is not None
        if r["inference_slowdown"] is None and r["training_slowdown"] is None:
            ax1.text(0.5, y, "not measured", va="center", ha="center", color="gray",
                     transform=ax1.get_yaxis_transform())
        if not r["bytes_on_wire"]:
            ax2.text(0.5, y, "no network" if measured else "not measured", va="center", ha="center", color="gray",
                     transform=ax2.get_yaxis_transform())
    fig.savefig(path, dpi=110)


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
