"""`veil bench`: plaintext, HE, MPC, federated learning and TEE measured side by side on one model and one split.

Privacy-preserving technologies are usually ranked by rule-of-thumb guesses of their cost (computation
~10000x slower than plaintext for HE, 10~100x for MPC, 10%~10x for TEE: `SEED_GUESSES`, printed beside
the measurements). This package measures those costs on the user's own data in one command: the same
model (a logistic regression or a small MLP with square activations) on the same train/test split
(`veil.fl.data.load_dataset` with ``seed=0``), in

- plaintext (scikit-learn / torch, one thread): the reference for accuracy, predictions and times;
- HE inference (CKKS on SEAL, `veil.ml`): batch and row layouts in-process, and through a local
  `veil serve` on 127.0.0.1;
- MPC training and inference (`veil.mpc`): 2 parties + a dealer as processes over mutual TLS 1.3;
- federated training (`veil.fl`, Flower, 10 owners) with and without SecAgg+, then encrypted
  inference of the federated model;
- TEE: measured inside an attesting enclave or confidential VM given a policy that trusts it
  (attested plaintext serving, `veil.bench.modes.tee`); elsewhere a row saying why not, never a
  made-up number.

Each mode is a function of `veil.bench.modes` returning a row (accuracy, agreement with plaintext
predictions, time per sample and per epoch or round, slowdown against plaintext time of the same
kind, bytes on the wire, key sizes, who sees what). `run_bench` runs them in order with a progress
bar, for the logistic regression and then the MLP (or the one chosen), and `veil.bench.report`
writes bench.json, bench.md and bench.png.

    from veil.bench import BenchConfig, run_bench
    report = run_bench(BenchConfig(dataset="iris", models=("mlp",), quick=True, out="bench-results"))
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from veil.bench.modes import SEED_GUESSES, BenchError, Context, Settings

BENCH_MODELS = ("logreg", "mlp")  # what `veil bench` measures; the FL row maps mlp to FL model "torch-mlp"
DEFAULT_OUT = "bench-results"

__all__ = ["BENCH_MODELS", "SEED_GUESSES", "BenchConfig", "BenchError", "load", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    """What `veil bench` runs.

    Parameters
    ----------
    dataset : str
        A scikit-learn dataset name (digits, iris, wine, breast_cancer) or an .npz file with a 2-D
        float array X and 1-D integer labels y.
    models : tuple of str
        Which of "logreg" and "mlp" (one hidden layer, square activation) to measure; both by default,
        one after the other, each in every mode.
    quick : bool
        Fewer epochs, rounds and timed samples (under about three minutes on two cores).
    out : str
        Directory for bench.json, bench.md and bench.png.
    progress : bool
        Show a progress bar on stderr.
    attest_policy : str, Path or veil.tee.Policy, optional
        A policy trusting this machine's TEE (vendor root, measurement): with it, on an attesting
        platform, the TEE row is measured.
    """

    dataset: str = "digits"
    models: tuple[str, ...] = BENCH_MODELS
    quick: bool = False
    out: str = DEFAULT_OUT
    progress: bool = True
    attest_policy: Any = None


def load(config: BenchConfig) -> list[Context]:
    """Validate `config` and load the split: one context per model; raises `BenchError` saying what is wrong."""
    from veil.errors import FederatedConfigError
    from veil.fl.data import load_dataset

    unknown = [m for m in config.models if m not in BENCH_MODELS]
    if unknown or not config.models:
        raise BenchError(f"unknown model {', '.join(map(repr, unknown)) or '(none given)'}: use one of {BENCH_MODELS}")
    try:
        data = load_dataset(config.dataset)
    except FederatedConfigError as exc:
        raise BenchError(str(exc)) from None
    if data.task != "classification":
        raise BenchError(f"{config.dataset!r} is a regression dataset; veil bench compares classifiers "
                         "(integer labels y)")
    if len(data.classes) < 2:
        raise BenchError(f"{config.dataset!r} has a single class; at least 2 are needed")
    settings = Settings.for_run(config.quick)
    policy = config.attest_policy
    if isinstance(policy, str | Path):
        from veil.tee import load_policy

        policy = load_policy(policy)
    return [Context(config.dataset, model, data, settings, attest_policy=policy)
            for model in dict.fromkeys(config.models)]


def _steps() -> list[tuple[str, Callable[[Context], dict[str, Any]]]]:
    from veil.bench import modes

    return [("plaintext", modes.plaintext), ("HE batch", modes.he_batch), ("HE row", modes.he_row),
            ("HE serve", modes.he_serve), ("MPC", modes.mpc), ("FL", lambda c: modes.federated(c, secagg=False)),
            ("FL + SecAgg+", lambda c: modes.federated(c, secagg=True)), ("TEE", modes.tee)]


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run_bench(config: BenchConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every mode on `config`'s data for each model, write the files into `config.out` and return
    the report (what bench.json holds; each row names its model). `echo` receives the terminal table
    at the end. Torch and the BLAS libraries run on one thread meanwhile (restored afterwards)."""

    import torch
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from veil.bench import report

    contexts = load(config)
    try:  # before minutes of measurements, not after
        Path(config.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot write results to {config.out}: {exc}") from None
    load_before = _load_average()
    start = time.perf_counter()
    rows = []
    steps = [(ctx, name, step) for ctx in contexts for name, step in _steps()]
    threads = torch.get_num_threads()
    # the models are tiny: more threads only contend. On this 2-core machine under load, Flower's owners
    # ran 40x slower with 2 torch threads and scikit-learn's lbfgs on digits 100x slower with 2 BLAS threads
    torch.set_num_threads(1)
    try:
        bar = tqdm(total=len(steps), unit="mode", disable=not config.progress, file=sys.stderr)
        with threadpool_limits(limits=1), bar:
            for ctx, name, step in steps:
                bar.set_description(f"{ctx.model_kind}: {name}")
                rows.append({"model": ctx.model_kind, **step(ctx)})
                bar.update()
    finally:
        torch.set_num_threads(threads)
    d = contexts[0].data
    result = {"dataset": config.dataset, "models": [c.model_kind for c in contexts], "quick": config.quick,
              "n_train": len(d.X_train), "n_test": len(d.X_test), "n_features": int(d.X_train.shape[1]),
              "classes": [c.item() if hasattr(c, "item") else c for c in d.classes],
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "load_before": load_before, "load_after": _load_average(),
              "wall_seconds": time.perf_counter() - start, "settings": asdict(contexts[0].settings),
              "seed_guesses": SEED_GUESSES, "rows": rows}
    paths = report.write(result, Path(config.out))
    if echo is not None:
        echo(report.terminal_table(result))
        echo("wrote " + ", ".join(str(p) for p in paths.values()))
    return result
