"""Encrypted batch inference on a local Ray cluster against local worker processes, in one run.

Predicts N digits rows (default 1,000,000: resampled from scikit-learn's digits with a little
jitter, stored as a float32 memmap so the input never sits in memory) with veil's encrypted
logistic regression three ways, one after the other on the same machine:
- `local`: `predict(X, fhe="execute", workers=W)`, chunks in W local worker processes;
- `ray-keys`: `RayExecutor(ship_keys=True)`, each Ray actor holding the client and its key;
- `ray-driver-key`: `RayExecutor()`, the key kept in this process (encrypt and decrypt here, the
  actors evaluate on ciphertexts only).
For each: rows/s, agreement of the decrypted labels with plaintext predictions, and the peak
resident memory of this process (sampled every 50 ms) next to the input's size. Ray runs with
mutual TLS (`write_dev_tls`), set in the environment before ray is imported.

Usage: python benchmarks/ray_executor.py [--rows N] [--workers W] [--out DIR]
Writes DIR/ray_executor.json and DIR/ray_executor.png; exits 1 if any agreement is below 1.0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from veil.program.cluster import RayExecutor, write_dev_tls

CHUNK_BYTES_NOTE = "default chunks: 4 ciphertexts of 4,096 rows (16,384 rows)"


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 50 ms."""

    def __enter__(self) -> PeakRSS:
        self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())


def rows_memmap(path: Path, n: int, seed: int = 0) -> np.memmap:
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, X.shape[1]))
    step = 100_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = X[rng.integers(0, len(X), hi - lo)] + rng.normal(0.0, 0.3, (hi - lo, X.shape[1]))
        mm[lo:hi] = np.clip(block, 0.0, 16.0)
    mm.flush()
    return np.load(path, mmap_mode="r")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="veil-ray-bench-"))
    os.environ.update(write_dev_tls(tmp / "tls"))  # before anything imports ray

    from sklearn.datasets import load_digits

    from veil.ml import LogisticRegression

    X0, y0 = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X0, y0).compile(X0)
    X = rows_memmap(tmp / "rows.npy", args.rows)
    plain = np.concatenate([model.predict(np.asarray(X[lo:lo + 100_000], dtype=np.float64))
                            for lo in range(0, args.rows, 100_000)])
    results = []
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    runs = [("local", {"workers": args.workers}),
            ("ray-keys", {"executor": RayExecutor(ship_keys=True)}),
            ("ray-driver-key", {"executor": RayExecutor()})]
    for name, kwargs in runs:
        model.predict(X[:40_000], fhe="execute", **kwargs)  # warm: pools started, keys loaded
        with PeakRSS() as rss:
            t = time.perf_counter()
            labels = model.predict(X, fhe="execute", **kwargs)
            seconds = time.perf_counter() - t
        agreement = float(np.mean(labels == plain))
        results.append({"name": name, "rows": args.rows, "seconds": seconds, "rows_per_s": args.rows / seconds,
                        "agreement": agreement, "peak_rss_mib": rss.peak / 2**20})
        print(f"{name:15s} {args.rows / seconds:10.0f} rows/s  agreement {agreement:.4f}  "
              f"peak RSS {rss.peak / 2**20:.0f} MiB", flush=True)
        if "executor" in kwargs:
            kwargs["executor"].close()
    ray.shutdown()
    base = results[0]["rows_per_s"]
    for r in results:
        r["ratio_to_local"] = r["rows_per_s"] / base
    out = {"benchmark": "ray_executor", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
           "workers": args.workers, "chunks": CHUNK_BYTES_NOTE,
           "input_mib": X.nbytes / 2**20, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_executor.json").write_text(json.dumps(out, indent=2) + "\n")
    chart(results, args.out / "ray_executor.png", args.rows)
    return 0 if all(r["agreement"] == 1.0 for r in results) else 1


def chart(results: list[dict], path: Path, n: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = [r["name"] for r in results]
    ax.bar(names, [r["rows_per_s"] for r in results], color=["#4c72b0", "#dd8452", "#55a868"])
    for i, r in enumerate(results):
        ax.text(i, r["rows_per_s"], f"{r['ratio_to_local']:.2f}x\n{r['peak_rss_mib']:.0f} MiB", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("encrypted rows / s")
    ax.set_title(f"{n:,} digits rows, encrypted logistic regression: Ray vs local processes", fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
