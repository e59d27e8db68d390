"""A run's files: the progress log, the result and the checkpoint the ServerApp writes after every round.

An output directory holds `result.json` (`FLResult.to_dict`) and `weights.npz` (the global weights),
each replaced atomically, and `progress.jsonl` (one evaluation row per line, which `veil.fl.deployment`
follows while a run goes on in other processes). A checkpoint is the same pair of files for the last
completed round; `load_checkpoint` also accepts a run's output directory holding `checkpoint/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import FederatedConfigError
from veil.fl.config import FLConfig, FLResult
from veil.fl.preprocessing import FederatedScaler
from veil.fl.privacy import PrivacyReport

PROGRESS_FILE = "progress.jsonl"
CHECKPOINT_DIR = "checkpoint"


def append_progress(out: Path, row: dict[str, Any]) -> None:
    """Append one round's evaluation `row` to `out/progress.jsonl`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PROGRESS_FILE, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def save_result(result: FLResult, out: Path) -> None:
    """Write `result.json` and the global weights `weights.npz` into `out`, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "weights.npz.tmp", "wb") as fh:
        np.savez(fh, *result.weights)
    (out / "weights.npz.tmp").replace(out / "weights.npz")
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(out / "result.json")


def load_result(out: Path) -> FLResult:
    """Read back what `save_result` wrote (e.g. by a ServerApp in another process)."""
    data = json.loads((out / "result.json").read_text())
    with np.load(out / "weights.npz") as npz:
        weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    privacy = PrivacyReport(**data["privacy"]) if data["privacy"] else None
    scaler = FederatedScaler.from_dict(data["scaler"]) if data.get("scaler") else None
    return FLResult(FLConfig.from_dict(data["config"]), data["history"], weights, data["rejected"], privacy,
                    data["wall_time"], data["n_features"], data["classes"], scaler=scaler,
                    statistics=data.get("statistics"), export=data.get("export"), traffic=data.get("traffic"))


def save_checkpoint(result: FLResult, directory: Path) -> None:
    """The global model, scaler and history after the last completed round (written after every round)."""
    save_result(result, directory)


def load_checkpoint(directory: Path) -> FLResult:
    """What `save_checkpoint` wrote; `directory` may also be a run's output directory holding `checkpoint/`."""
    directory = Path(directory)
    if (directory / CHECKPOINT_DIR / "result.json").exists():
        directory = directory / CHECKPOINT_DIR
    if not (directory / "result.json").exists():
        raise FederatedConfigError(f"no checkpoint in {directory}")
    return load_result(directory)
