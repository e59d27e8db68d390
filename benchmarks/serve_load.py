"""Bounded load test of the encrypted inference server on loopback.

Digits logistic regression (64 features, 10 classes). For each configuration (front end computing
in-process, and a Redis queue with 1 and 2 `veil worker` processes) it starts real processes on
free 127.0.0.1 ports, then runs concurrent clients that each send pre-encrypted single-sample
requests (row layout) for a bounded number of requests and seconds. It reports throughput and
p50/p99 latency of the HTTP request, plus the client-side end-to-end latency of one sample
(encrypt + request + decrypt) measured sequentially. Writes JSON and a PNG chart.

    python benchmarks/serve_load.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_digits

from veil import ml
from veil.net import free_port
from veil.serve import Client
from veil.serve.auth import add_token_to_file

ROOT = Path(__file__).resolve().parent.parent
TARGET_P50_MS = 30.0


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


@contextlib.contextmanager
def processes(commands: list[list[str]], env: dict[str, str], logdir: Path) -> Iterator[list[subprocess.Popen]]:
    """Start processes with output to log files; terminate (then kill) them all on exit."""
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = open(logdir / f"proc{i}.log", "wb")  # noqa: SIM115 - closed with the process below
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stdout:
                p.stdout.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_phase(url: str, token: str, requests: list[bytes], key_id: str, version: int, concurrency: int,
               max_requests: int, max_seconds: float) -> dict:
    """`concurrency` threads send pre-encrypted requests until either bound is reached."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds
    per_thread = max_requests // concurrency

    def worker(offset: int) -> None:
        nonlocal errors
        with Client(url, token, retries=0, timeout=60) as client:
            for i in range(per_thread):
                if time.monotonic() > stop_at:
                    return
                payload = requests[(offset + i) % len(requests)]
                t = time.perf_counter()
                try:
                    client.send("digits", version, key_id, payload)
                except Exception:
                    with lock:
                        errors += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": wall,
            "throughput_rps": len(latencies) / wall if wall else 0.0,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def run_config(name: str, workers: int, model_dir: Path, X: np.ndarray, args: argparse.Namespace,
               tmp: Path) -> dict:
    """Start the servers for one configuration, measure, stop them."""
    data = tmp / name
    data.mkdir()
    tokens = data / "tokens.json"
    admin = add_token_to_file(tokens, "admin", "admin")
    user = add_token_to_file(tokens, "bench", "client")
    env = dict(os.environ, VEIL_MODEL_KEY=os.urandom(32).hex(), OMP_NUM_THREADS="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "veil.cli", "serve", "--port", str(port), "--data-dir", str(data),
             "--tokens", str(tokens), "--log-level", "warning"]
    commands = []
    if workers:
        redis_port = free_port()
        queue = f"redis://127.0.0.1:{redis_port}/0"
        commands.append(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(data)])
        serve += ["--queue", queue]
        commands += [[sys.executable, "-m", "veil.cli", "worker", "--queue", queue, "--data-dir", str(data),
                      "--name", f"w{i}", "--log-level", "warning"] for i in range(workers)]
    with processes(commands, env, data), processes([serve], env, data):
        wait_http(url)
        with Client(url, admin) as a:
            version = a.deploy(model_dir, "digits")["version"]
        with Client(url, user) as client:
            _, mc = client.model("digits", version)
            key_id = client.register(mc.public_bundle_bytes("row"))
            pool = [mc.encrypt(X[i:i + 1], "row")[1] for i in range(args.pool)]
            for payload in pool[:5]:
                client.send("digits", version, key_id, payload)
            e2e = []
            for i in range(args.sequential):
                t = time.perf_counter()
                _, req = mc.encrypt(X[i:i + 1], "row")
                pred = mc.predict(mc.decrypt(client.send("digits", version, key_id, req)))
                e2e.append(time.perf_counter() - t)
                if pred[0] != args.expected[i]:
                    raise RuntimeError("encrypted prediction differs from plaintext")
        phases = [load_phase(url, user, pool, key_id, version, c, args.max_requests, args.max_seconds)
                  for c in args.concurrency]
    return {"name": name, "workers": workers, "e2e_single_sample_p50_ms": percentile(e2e, 50) * 1e3,
            "e2e_single_sample_p99_ms": percentile(e2e, 99) * 1e3, "phases": phases}


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, res in enumerate(results):
        conc, color = [p["concurrency"] for p in res["phases"]], f"C{i}"
        left.plot(conc, [p["throughput_rps"] for p in res["phases"]], "o-", color=color, label=res["name"])
        right.plot(conc, [p["p50_ms"] for p in res["phases"]], "o-", color=color, label=f"{res['name']} p50")
        right.plot(conc, [p["p99_ms"] for p in res["phases"]], "x--", color=color, label=f"{res['name']} p99")
    left.set(xlabel="concurrent clients", ylabel="requests / s", title="Throughput (1 sample per request)")
    right.set(xlabel="concurrent clients", ylabel="ms", title="HTTP request latency", yscale="log")
    right.axhline(TARGET_P50_MS, color="grey", lw=0.8, ls=":", label="30 ms target (p50)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"veil serve: digits logistic regression, row layout, {os.cpu_count()} CPUs, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.concurrency = [1, 4] if args.quick else [1, 2, 4, 8]
    args.max_requests = 80 if args.quick else 400
    args.max_seconds = 10.0 if args.quick else 30.0
    args.pool = 32
    args.sequential = 20 if args.quick else 60
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server); cluster configurations skipped")

    X, y = load_digits(return_X_y=True)
    model = ml.LogisticRegression(max_iter=3000).fit(X, y).compile(X)
    args.expected = model.predict(X[: args.sequential])
    configs = [("in-process", 0)]
    if shutil.which("redis-server"):
        configs += [("redis, 1 worker", 1), ("redis, 2 workers", 2)]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model.save(tmp / "model")
        results = [run_config(name, w, tmp / "model", X, args, tmp) for name, w in configs]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single = [p for r in results for p in r["phases"] if p["concurrency"] == 1]
    best_p50 = min(p["p50_ms"] for p in single)
    report = {"benchmark": "serve_load", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "quick": args.quick,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "loadavg_start": os.getloadavg()},
              "model": "digits LogisticRegression, row layout (1 sample per request)",
              "bounds": {"max_requests": args.max_requests, "max_seconds": args.max_seconds},
              "results": results,
              "target": {"single_sample_p50_ms": TARGET_P50_MS, "best_p50_ms": best_p50,
                         "pass": best_p50 < TARGET_P50_MS}}
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    chart(results, out / "serve_load.png")
    print(f"{'configuration':18s} {'clients':>7s} {'req':>5s} {'err':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        for p in r["phases"]:
            print(f"{r['name']:18s} {p['concurrency']:7d} {p['requests']:5d} {p['errors']:4d} "
                  f"{p['throughput_rps']:8.1f} {p['p50_ms']:8.1f} {p['p99_ms']:8.1f}")
        print(f"{r['name']:18s} end-to-end one sample (encrypt+HTTP+decrypt): "
              f"p50 {r['e2e_single_sample_p50_ms']:.1f} ms, p99 {r['e2e_single_sample_p99_ms']:.1f} ms")
    print(f"single-sample p50 target < {TARGET_P50_MS:.0f} ms: {'PASS' if best_p50 < TARGET_P50_MS else 'FAIL'} "
          f"({best_p50:.1f} ms)")
    errors = sum(p["errors"] for r in results for p in r["phases"])
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
