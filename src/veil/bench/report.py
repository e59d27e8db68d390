"""Writing `veil bench`'s results: the Markdown table (also printed), bench.json and bench.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from veil.bench.modes import SEED_GUESSES

# the guessed slowdowns of SEED_GUESSES as intervals for the chart ("~10000x" drawn as 5000-20000)
GUESS_RANGES = {"plaintext": (1.0, 1.0), "HE": (5e3, 2e4), "FL": (5e3, 2e4), "MPC": (10.0, 100.0),
                "TEE": (1.1, 10.0)}

MODEL_NAMES = {"logreg": "logistic regression", "mlp": "MLP, square activation"}

COLUMNS = ("mode", "accuracy", "agreement", "inference per sample", "slowdown (inference)", "training time",
           "slowdown (training)", "bytes on wire", "key bytes", "seed's guess")


def seed_guess(mode: str) -> str:
    """The guessed computation slowdown (`SEED_GUESSES`) for the technology of `mode` ("" for none)."""
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
    if kind == "s":
        for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
            if value >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value * 1e9:.3g} ns"
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


def _by_model(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {m: [r for r in report["rows"] if r["model"] == m] for m in report["models"]}


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: a numbers table per model, then what each row measures and who sees what."""
    lines = [f"`veil bench` on {report['dataset']} ({report['n_train']} train / {report['n_test']} test rows, "
             f"{report['n_features']} features), {report['date']}, load average {report['load_before']} -> "
             f"{report['load_after']}, {'quick' if report['quick'] else 'full'} run in "
             f"{report['wall_seconds']:.0f} s"]
    for model, rows in _by_model(report).items():
        lines += ["", f"**{MODEL_NAMES[model]}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| model | mode | what it measures | who sees what |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['measures']} | {r['threat_model']} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def terminal_table(report: dict[str, Any]) -> str:
    """The numbers table aligned for a terminal, one block per model."""
    header = ["model", *COLUMNS]
    cells = [header] + [[r["model"], *c] for r, c in zip(report["rows"], table_rows(report["rows"]), strict=True)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """bench.png: per model, slowdown against plaintext (inference and training, with the guesses of `SEED_GUESSES`)
    and bytes on the wire per mode, log axes; a mode without a number (TEE) is labelled "not measured"."""
    groups = _by_model(report)
    fig = Figure(figsize=(13, 5 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (model, rows), (ax1, ax2) in zip(groups.items(), axes, strict=True):
        _plot_model(report["dataset"], model, rows, ax1, ax2)
    fig.savefig(path, dpi=110)


def _plot_model(dataset: str, model: str, rows: list[dict[str, Any]], ax1: Any, ax2: Any) -> None:
    names = [r["mode"] for r in rows]
    ys = range(len(rows))
    for offset, key, label, color in ((-0.2, "inference_slowdown", "inference", "tab:blue"),
                                      (0.2, "training_slowdown", "training", "tab:orange")):
        ax1.barh([y + offset for y in ys], [r[key] or float("nan") for r in rows], height=0.4, label=label,
                 color=color)
    guessed = [(y, GUESS_RANGES[k]) for y, r in zip(ys, rows, strict=True)
               for k in GUESS_RANGES if r["mode"].startswith(k)]
    for i, (y, (lo, hi)) in enumerate(guessed):
        ax1.plot([lo, hi], [y, y], color="black", marker="|", markersize=14, linewidth=2,
                 label="seed's guess" if i == 0 else None)
    ax1.set_xscale("log")
    ax1.set_xlabel("slowdown against plaintext (x, log)")
    ax1.set_title(f"{dataset}, {MODEL_NAMES[model]}: time against plaintext")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax2.barh(list(ys), [r["bytes_on_wire"] or float("nan") for r in rows], color="tab:green")
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes on the wire for the measured run (log)")
    ax2.set_title("bytes on the wire")
    for ax in (ax1, ax2):
        ax.set_yticks(list(ys), names)
        ax.set_ylim(len(rows) - 0.5, -0.5)
    for y, r in zip(ys, rows, strict=True):
        measured = r["accuracy"] is not None
        if r["inference_slowdown"] is None and r["training_slowdown"] is None:
            ax1.text(0.5, y, "not measured", va="center", ha="center", color="gray",
                     transform=ax1.get_yaxis_transform())
        if not r["bytes_on_wire"]:
            ax2.text(0.5, y, "no network" if measured else "not measured", va="center", ha="center", color="gray",
                     transform=ax2.get_yaxis_transform())


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
