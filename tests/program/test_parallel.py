"""The chunked, process-parallel executor against the in-process reference path."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.datasets import load_digits

from veil.errors import ExecutorError, PrecisionError, ShapeError, WireFormatError
from veil.ml import LinearCircuit, LinearClient, LogisticRegression
from veil.program import parallel
from veil.program.parallel import ChunkedExecutor, execute_chunked

SLOTS = 4096
"""Slot count of the batch layout's default preset (N = 8192)."""


@pytest.fixture(scope="module")
def digits_model():
    X, y = load_digits(return_X_y=True)
    return LogisticRegression(max_iter=2000).fit(X, y).compile(X)


def resampled(n: int, seed: int = 0, dtype: type = np.float64) -> np.ndarray:
    """n digits rows drawn with replacement plus a little jitter, clipped to the pixel range."""
    X, _ = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    rows = X[rng.integers(0, len(X), n)] + rng.normal(0.0, 0.3, (n, X.shape[1]))
    return np.clip(rows, 0.0, 16.0).astype(dtype)


def setup(model, workers: int = 2) -> dict:
    client = model.fhe_client
    return {"server_dict": model.circuit_.to_dict(), "client_spec": model.circuit_.client_spec(),
            "load_server": LinearCircuit.from_dict, "load_client": LinearClient,
            "keys": {"batch": client.keys("batch").to_bytes()}, "workers": workers}


def reference(model, X: np.ndarray) -> np.ndarray:
    """The in-process path: the whole batch encrypted, evaluated and decrypted at once."""
    client = model.fhe_client
    request = client.encrypt(X, "batch")
    return client.decrypt(model.circuit_.run(request, client.public_bundle("batch")))


def assert_within_noise(got: np.ndarray, ref: np.ndarray) -> None:
    """Two encryptions of the same rows differ only by fresh CKKS noise (~1e-4 absolute here,
    a few 1e-6 of the largest output); a misplaced row or output would differ by units."""
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.fixture(scope="module")
def executor(digits_model):
    ex = ChunkedExecutor(**setup(digits_model))
    yield ex
    ex.close()


def test_pool_matches_in_process_path_in_order(digits_model, executor):
    X = resampled(4 * SLOTS + 123)
    raw = executor.run(X, "batch", chunk_rows=SLOTS, progress=False)
    ref = reference(digits_model, X)
    assert_within_noise(raw, ref)
    assert np.array_equal(raw.argmax(axis=1), ref.argmax(axis=1))
    plain = digits_model.predict(X)
    assert np.array_equal(digits_model.output_spec_.predict(raw), plain)
    reversed_raw = executor.run(X[::-1], "batch", chunk_rows=SLOTS, progress=False)
    assert_within_noise(reversed_raw[::-1], ref)


def test_pool_is_reused_and_takes_float32_and_memmap(digits_model, executor, tmp_path):
    X = resampled(3 * SLOTS, seed=1, dtype=np.float32)
    path = tmp_path / "rows.f32"
    X.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    pool = executor._pool
    raw = executor.run(mm, "batch", chunk_rows=SLOTS, progress=False)
    assert pool is None or executor._pool is pool
    assert_within_noise(raw, reference(digits_model, X.astype(np.float64)))


def test_row_layout_runs_through_the_pool(digits_model):
    """Row-layout chunks need Galois keys: each worker derives its bundle from the secret key."""
    client = digits_model.fhe_client
    args = setup(digits_model)
    args["keys"] = {"row": client.keys("row").to_bytes()}
    slots = client.params["row"].slot_count
    X = resampled(2 * slots + 5, seed=5)
    with ChunkedExecutor(**args) as ex:
        raw = ex.run(X, "row", chunk_rows=slots, progress=False)
    ref = client.decrypt(digits_model.circuit_.run(client.encrypt(X, "row"), client.public_bundle("row")))
    assert_within_noise(raw, ref)


def test_chunk_rows_round_up_to_full_ciphertexts(executor):
    assert executor.chunk_rows("batch", 1) == SLOTS
    assert executor.chunk_rows("batch", SLOTS + 1) == 2 * SLOTS
    assert executor.chunk_rows("batch") == parallel.DEFAULT_CHUNK_CTS * SLOTS
    with pytest.raises(ValueError):
        executor.chunk_rows("batch", 0)


def test_single_worker_runs_chunked_in_process(digits_model):
    X = resampled(2 * SLOTS + 7, seed=2)
    with ChunkedExecutor(**setup(digits_model, workers=1)) as ex:
        raw = ex.run(X, "batch", chunk_rows=SLOTS, progress=False)
        assert ex._pool is None
    assert_within_noise(raw, reference(digits_model, X))


def test_progress_bar_goes_to_stderr_on_request(digits_model, capsys):
    with ChunkedExecutor(**setup(digits_model, workers=1)) as ex:
        ex.run(resampled(SLOTS + 1), "batch", chunk_rows=SLOTS, progress=True)
        assert "rows" in capsys.readouterr().err
        ex.run(resampled(SLOTS + 1), "batch", chunk_rows=SLOTS, progress=False)
        assert capsys.readouterr().err == ""


def test_worker_error_is_raised_with_its_type(digits_model, executor):
    X = resampled(5 * SLOTS, seed=3)
    X[2 * SLOTS + 5, 10] = 1e6
    with pytest.raises(PrecisionError, match="sample 5 ") as info:
        executor.run(X, "batch", chunk_rows=SLOTS, progress=False)
    assert any(f"rows {2 * SLOTS}:{3 * SLOTS}" in note for note in info.value.__notes__)
    X[2 * SLOTS + 5, 10] = 1.0
    assert executor.run(X, "batch", chunk_rows=SLOTS, progress=False).shape == (5 * SLOTS, 10)


def test_bad_keys_in_workers_raise_typed_errors(digits_model):
    args = setup(digits_model)
    args["keys"] = {"batch": b"not a key"}
    with ChunkedExecutor(**args) as ex, pytest.raises(WireFormatError):
        ex.run(resampled(2 * SLOTS), "batch", chunk_rows=SLOTS, progress=False)
    args["keys"] = {"batch": digits_model.fhe_client.keys("row").to_bytes()}
    with pytest.raises(ShapeError, match="other parameters"):
        execute_chunked(resampled(2 * SLOTS), layout="batch", chunk_rows=SLOTS, **args)
    parallel.shutdown()


def die(server_dict: dict) -> None:
    """A server loader whose worker process exits abruptly, as when killed or out of memory."""
    os._exit(3)


def test_dead_worker_raises_executor_error_not_a_hang(digits_model):
    args = setup(digits_model)
    args["load_server"] = die
    with ChunkedExecutor(**args) as ex:
        with pytest.raises(ExecutorError, match="worker process died"):
            ex.run(resampled(2 * SLOTS), "batch", chunk_rows=SLOTS, progress=False)
        assert ex._pool is None


class DyingServer:
    """A server that exits abruptly on its second chunk: a worker killed in the middle of a run."""

    def __init__(self, server_dict: dict) -> None:
        self.circuit, self.calls = LinearCircuit.from_dict(server_dict), 0

    def run(self, request: bytes, bundle) -> bytes:
        self.calls += 1
        if self.calls == 2:
            os._exit(9)
        return self.circuit.run(request, bundle)


@pytest.mark.timeout(120)
def test_worker_killed_mid_run_raises_executor_error(digits_model):
    args = setup(digits_model)
    args["load_server"] = DyingServer
    with ChunkedExecutor(**args) as ex:
        with pytest.raises(ExecutorError, match="exit status 9"):
            ex.run(resampled(6 * SLOTS), "batch", chunk_rows=SLOTS, progress=False)
        assert ex._pool is None


NO_GUARD_SCRIPT = textwrap.dedent("""
    import numpy as np
    from sklearn.datasets import load_digits
    from veil.ml import LogisticRegression

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X, y).compile(X)
    rows = np.tile(X, (23, 1))[:40_000]
    print("agreement", np.mean(model.predict(rows, fhe="execute", workers=2) == model.predict(rows)))
""")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("how", ["script", "stdin"])
def test_script_without_main_guard_predicts_40000_rows(tmp_path, how):
    """Workers are fresh interpreters that never import the caller's __main__, so a plain script
    (and `python -`) needs no `if __name__ == "__main__":` guard; multiprocessing's spawn re-ran
    the script in every worker, which then hung the parent."""
    script = tmp_path / "plain.py"
    script.write_text(NO_GUARD_SCRIPT)
    command = [sys.executable, str(script)] if how == "script" else [sys.executable, "-"]
    out = subprocess.run(command, input=None if how == "script" else NO_GUARD_SCRIPT, capture_output=True,
                         text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["agreement", "1.0"], out.stdout


def test_loaders_must_be_picklable(digits_model):
    args = setup(digits_model)
    args["load_server"] = lambda d: LinearCircuit.from_dict(d)
    with pytest.raises(TypeError, match="picklable"):
        ChunkedExecutor(**args)


def test_model_predict_uses_workers_for_large_inputs(digits_model):
    n = parallel.DEFAULT_CHUNK_CTS * SLOTS + 100
    X = resampled(n, seed=4, dtype=np.float32)
    enc = digits_model.predict(X, fhe="execute", workers=2)
    assert np.array_equal(enc, digits_model.predict(X.astype(np.float64)))
    with pytest.raises(ValueError, match="workers"):
        digits_model.predict(X[:10], fhe="execute", workers=0)
    parallel.shutdown()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from sklearn.datasets import load_digits
    from veil.ml import LogisticRegression
    from veil.program import parallel

    def status_mb(field, pid="self"):
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    def children():
        out = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.append(entry)
        return out

    if __name__ == "__main__":
        n, workers = int(sys.argv[1]), int(sys.argv[2])
        X0, y = load_digits(return_X_y=True)
        model = LogisticRegression(max_iter=2000).fit(X0, y).compile(X0)
        model.predict(X0[:100], fhe="execute")
        rng = np.random.default_rng(0)
        X = np.empty((n, 64), dtype=np.float32)
        for lo in range(0, n, 50_000):
            hi = min(n, lo + 50_000)
            X[lo:hi] = np.clip(X0[rng.integers(0, len(X0), hi - lo)] + rng.normal(0, 0.3, (hi - lo, 64)), 0, 16)
        before = status_mb("VmRSS:")
        pred = model.predict(X, fhe="execute", workers=workers)
        kids = [status_mb("VmHWM:", pid) for pid in children()]
        parallel.shutdown()
        peak = status_mb("VmHWM:")
        agree = float(np.mean(pred[:20_000] == model.predict(X[:20_000].astype(np.float64))))
        print(json.dumps({"before": before, "peak": peak, "children": kids, "agree": agree}))
""")


def peak_growth(n: int, workers: int, tmp_path) -> dict:
    """Run a large encrypted prediction in a fresh interpreter; peak RSS figures in MB.

    Peaks are VmHWM (per address space), not getrusage's ru_maxrss: on Linux a process started
    by vfork+exec (subprocess, multiprocessing spawn) inherits its parent's high-water mark in
    ru_maxrss, so the pytest process's size, or the parent's, would show up as the child's peak."""
    script = tmp_path / "memory_run.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(n), str(workers)], capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_memory_stays_bounded_for_300k_rows(tmp_path):
    """The whole-batch path needs ~7.5 KB per row (> 2 GB for 300,000 rows); chunked, the parent
    grows only by the (n, 10) float64 outputs plus in-flight chunks (~55 MB measured), and each
    worker peaks at ~310 MB, of which ~170 MB is its imports (numpy, SEAL, scikit-learn) and the
    rest one 16,384-row chunk in flight (~680 MB in all measured). The total bounds every
    process together (the children also include multiprocessing's small resource tracker)."""
    workers = 2
    r = peak_growth(300_000, workers, tmp_path)
    parent = r["peak"] - r["before"]
    assert r["agree"] == 1.0
    assert len(r["children"]) >= workers, r
    assert parent < 150, r
    assert parent + sum(r["children"]) < 800, r


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in items}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_pool_workers_share_the_cores_between_their_blas_threads(digits_model, monkeypatch):
    """Two workers with one BLAS thread per core each would oversubscribe the cores: each worker
    gets cores // workers BLAS threads, unless the user set a BLAS thread count (which wins)."""
    for var in parallel.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    X = resampled(2 * SLOTS, seed=7)
    expected = str(max(1, (os.cpu_count() or 1) // 2))
    with ChunkedExecutor(**setup(digits_model, workers=2)) as ex:
        ex.run(X, "batch", chunk_rows=SLOTS, progress=False)
        envs = [_environ(w.proc.pid) for w in ex._pool.workers]
    assert len(envs) == 2
    assert all(env.get(var) == expected for env in envs for var in parallel.BLAS_THREAD_VARIABLES)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with ChunkedExecutor(**setup(digits_model, workers=2)) as ex:
        ex.run(X, "batch", chunk_rows=SLOTS, progress=False)
        envs = [_environ(w.proc.pid) for w in ex._pool.workers]
    assert all(env.get("OMP_NUM_THREADS") == "3" and "OPENBLAS_NUM_THREADS" not in env for env in envs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_pool_workers_keep_freed_memory_unless_the_user_tunes_malloc(digits_model, monkeypatch):
    """Workers start with `ALLOCATOR_SETTINGS` in their environment (glibc reads it at start), and
    without them when the user's environment sets any MALLOC_ variable."""
    for var in [v for v in os.environ if v.startswith("MALLOC_")]:
        monkeypatch.delenv(var)
    X = resampled(2 * SLOTS, seed=7)
    expected = {var: str(value) for var, (_, value) in parallel.ALLOCATOR_SETTINGS.items()}
    with ChunkedExecutor(**setup(digits_model, workers=2)) as ex:
        ex.run(X, "batch", chunk_rows=SLOTS, progress=False)
        envs = [_environ(w.proc.pid) for w in ex._pool.workers]
    assert len(envs) == 2 and all({k: env.get(k) for k in expected} == expected for env in envs)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with ChunkedExecutor(**setup(digits_model, workers=2)) as ex:
        ex.run(X, "batch", chunk_rows=SLOTS, progress=False)
        envs = [_environ(w.proc.pid) for w in ex._pool.workers]
    assert all(env.get("MALLOC_ARENA_MAX") == "2" and not set(expected) & set(env) for env in envs)


FAULTS = """
import os, resource, sys
import numpy as np
from veil.program import parallel
applied = parallel.tune_allocator() if sys.argv[1] == "tune" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a, b = np.ones(300_000), np.ones(300_000)
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(applied, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc malloc")
@pytest.mark.parametrize("how", ["default", "tune", "env"])
def test_tuned_allocator_stops_refaulting_freed_buffers(how):
    """Making and freeing 2.4 MB arrays page-faults them in afresh each time under glibc's defaults
    (about 1,200 pages a pair); `tune_allocator` (for a running process) and `ALLOCATOR_SETTINGS`
    in the environment (for a worker) keep the freed memory, so the loop faults almost nothing.
    A MALLOC_ variable of the user's own leaves the defaults alone (`tune_allocator` returns False)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if how == "env":
        env.update({var: str(value) for var, (_, value) in parallel.ALLOCATOR_SETTINGS.items()})
    out = subprocess.run([sys.executable, "-c", FAULTS, how], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    applied, faults = out[0], int(out[1])
    if how == "default":
        assert faults > 50_000, out
    else:
        assert faults < 5_000, out
        assert applied == ("True" if how == "tune" else "None")
    if how == "tune":
        env["MALLOC_ARENA_MAX"] = "4"
        out = subprocess.run([sys.executable, "-c", FAULTS, how], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        assert out[0] == "False" and int(out[1]) > 50_000, out
