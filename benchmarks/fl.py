"""Federated digits logistic regression: accuracy per round and wall time for plain FedAvg, SecAgg+ and DP.

Every configuration runs on Flower's simulation engine (Ray) with the same owners (IID split, seed 0)
and central evaluation on the same 360 held-out digits; the final model of each is also compiled and
run on encrypted inputs (CKKS) to check that encrypted predictions equal the plaintext ones.
Wall time includes Ray's start-up (~10 s here), which dominates at this size.

Second part, federated preprocessing on/off: wine, breast_cancer, iris and digits with 5 IID owners and
default settings on veil's in-process grid (the same Flower apps without Ray), raw features against
federated standardization (plain and SecAgg+), each against central training (StandardScaler + the same
estimator on all rows), with the statistics rounds' count and wall time.

Usage: python benchmarks/fl.py [--clients 10] [--rounds 15] [--out benchmarks/results]
Writes OUT/fl.json and OUT/fl.png; exits 1 if encrypted and plaintext predictions ever disagree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from veil.fl.config import FLConfig
from veil.fl.data import load_dataset
from veil.fl.export import to_veil_model
from veil.fl.simulation import run_simulation

RUNS = {
    "FedAvg": {},
    "FedAvg + SecAgg+": {"secagg": True},
    "FedAvg + DP server (sigma=0.3, C=0.5)": {"dp": "server", "noise_multiplier": 0.3, "clipping_norm": 0.5},
    "FedAvg + DP server (sigma=1.0, C=0.5)": {"dp": "server", "noise_multiplier": 1.0, "clipping_norm": 0.5},
    "FedAvg + DP client (sigma=0.3, C=0.5)": {"dp": "client", "noise_multiplier": 0.3, "clipping_norm": 0.5},
    "FedAvg + SecAgg+ + DP client (sigma=0.3, C=0.5)": {"dp": "client", "secagg": True, "noise_multiplier": 0.3,
                                                         "clipping_norm": 0.5},
}


PREPROCESSING = {"raw features": {"scaling": "off"}, "federated standardization": {},
                 "federated standardization + SecAgg+": {"secagg": True}}


def preprocessing_runs(datasets: tuple[str, ...] = ("wine", "breast_cancer", "iris", "digits"),
                       owners: int = 5) -> list[dict]:
    """Final accuracy with and without federated preprocessing per dataset, and the statistics' cost."""
    rows = []
    for name in datasets:
        data = load_dataset(name)
        central = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(data.X_train, data.y_train)
        row = {"dataset": name, "central_accuracy": float(central.score(data.X_test, data.y_test)), "runs": {}}
        for label, extra in PREPROCESSING.items():
            result = run_simulation(FLConfig(clients=owners, dataset=name, **extra), engine="inprocess")
            stats = result.statistics or {}
            row["runs"][label] = {"accuracy": result.accuracy()[-1], "wall_time_s": round(result.wall_time, 2),
                                  "statistics_rounds": stats.get("rounds", 0),
                                  "statistics_wall_time_s": round(stats.get("wall_time", 0.0), 3)}
        rows.append(row)
        print(f"{name:14s} central {row['central_accuracy']:.3f}  " + "  ".join(
            f"{k}: {v['accuracy']:.3f} (stats {v['statistics_rounds']} rounds, {v['statistics_wall_time_s']} s)"
            for k, v in row["runs"].items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    data = load_dataset("digits")
    runs, ok = [], True
    reference = None
    for name, extra in RUNS.items():
        cfg = FLConfig(clients=args.clients, rounds=args.rounds, **extra)
        result = run_simulation(cfg)
        model = to_veil_model(result, data.X_test)
        encrypted = model.predict(data.X_test, fhe="execute")
        plain = result.predict(data.X_test)  # the plaintext federated model on raw features (scaler applied)
        agreement = float(np.mean(encrypted == plain))
        ok &= agreement == 1.0
        if reference is None:
            reference = result.round_weights
        diff = max(float(np.abs(a - b).max()) for a, b in zip(result.weights, reference[-1], strict=True))
        diff1 = max(float(np.abs(a - b).max()) for a, b in zip(result.round_weights[1], reference[1], strict=True))
        runs.append({"name": name, "config": extra, "accuracy": result.accuracy(),
                     "loss": [h["loss"] for h in result.history], "wall_time_s": round(result.wall_time, 2),
                     "encrypted_accuracy": float(np.mean(encrypted == data.y_test)),
                     "encrypted_plaintext_agreement": agreement, "max_abs_weight_diff_vs_fedavg": diff,
                     "max_abs_weight_diff_vs_fedavg_round1": diff1,
                     "privacy": None if result.privacy is None else result.privacy.to_dict()})
        print(f"{name:50s} acc/round {[round(a, 3) for a in result.accuracy()]} "
              f"wall {result.wall_time:.1f} s  encrypted acc {runs[-1]['encrypted_accuracy']:.3f}"
              + ("" if result.privacy is None else f"  eps {result.privacy.epsilon:.2f} (delta 1e-5)"))
    preprocessing = preprocessing_runs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "fl", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "dataset": "digits (1437 train / 360 test, IID over owners)",
              "model": "logreg (lbfgs, 1 local iter, federated standardization)",
              "clients": args.clients, "rounds": args.rounds, "engine": "flwr simulation (Ray)",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "flwr": metadata.version("flwr")}, "runs": runs,
              "preprocessing": {"owners": 5, "partition": "iid", "engine": "in-process grid",
                                "settings": "defaults (logreg, max_iter=1, 15 rounds)", "datasets": preprocessing}}
    (out / "fl.json").write_text(json.dumps(report, indent=2))
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, run in enumerate(runs):
        label = f"{run['name']} ({run['wall_time_s']} s)"
        style = "--" if "SecAgg" in run["name"] else "-"
        ax.plot(range(len(run["accuracy"])), run["accuracy"], style, marker="os^vDx"[i % 6], label=label, alpha=0.85)
    ax.set_xlabel("round")
    ax.set_ylabel("central accuracy (360 held-out digits)")
    ax.set_title(f"Federated logistic regression, {args.clients} owners")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    labels = ["central", *PREPROCESSING]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [row["central_accuracy"] if label == "central" else row["runs"][label]["accuracy"]
                  for row in preprocessing]
        bars.bar(np.arange(len(preprocessing)) + i * width, values, width, label=label)
    bars.set_xticks(np.arange(len(preprocessing)) + 0.4 - width / 2, [row["dataset"] for row in preprocessing])
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("test accuracy")
    bars.set_title("Federated preprocessing, 5 IID owners, defaults")
    bars.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "fl.png", dpi=120)
    print(f"wrote {out / 'fl.json'} and {out / 'fl.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
