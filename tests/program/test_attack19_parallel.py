"""Attack review of issue 19's parallel encrypted inference (second round): concurrent callers,
interrupts, `python -c`, and what other processes can read of the secret keys.

Each test either passes (the defence holds: kept as a regression test) or is a strict xfail (a
finding, reproduced). Two workers, chunks of one ciphertext (4,096 rows)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from veil.ml import LogisticRegression
from veil.program import parallel
from veil.program.parallel import ChunkedExecutor

from . import test_parallel
from .test_parallel import SLOTS, assert_within_noise, reference, resampled, setup

digits_model = test_parallel.digits_model  # the same module-scoped fixture


def _both(calls: list) -> list:
    """Run the zero-argument ``calls`` at once in threads; each one's result or exception."""
    out: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def body(i):
        start.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # reported, not lost
            out[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return out


@pytest.mark.timeout(240)
def test_two_threads_running_one_executor_each_get_their_own_rows(digits_model):
    X1, X2 = resampled(4 * SLOTS, seed=1), resampled(4 * SLOTS, seed=2)
    with ChunkedExecutor(**setup(digits_model)) as ex:
        got = _both([lambda: ex.run(X1, "batch", chunk_rows=SLOTS, progress=False),
                     lambda: ex.run(X2, "batch", chunk_rows=SLOTS, progress=False)])
    for X, out in zip((X1, X2), got, strict=True):
        assert isinstance(out, np.ndarray), repr(out)
        assert_within_noise(out, reference(digits_model, X))


@pytest.mark.timeout(240)
def test_predicting_with_two_models_in_two_threads_completes(digits_model):
    X, y = load_digits(return_X_y=True)
    other = LogisticRegression(max_iter=500, C=0.1).fit(X, y).compile(X)
    rows = resampled(48 * SLOTS, seed=3)

    def second():  # starts once the first call's workers are busy
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cached = parallel._cached
            if cached is not None and cached[1]._pool is not None:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        return other.predict(rows[: 5 * SLOTS], fhe="execute", workers=2)

    try:
        got = _both([lambda: digits_model.predict(rows, fhe="execute", workers=2), second])
    finally:
        parallel.shutdown()
    for model, out, X in zip((digits_model, other), got, (rows, rows[: 5 * SLOTS]), strict=True):
        assert isinstance(out, np.ndarray), repr(out)
        assert np.array_equal(out, model.predict(X))


INTERRUPTED = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    from sklearn.datasets import load_digits
    from veil.ml import LogisticRegression
    from veil.program import parallel

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X, y).compile(X)
    rows = np.tile(X, (560, 1))[:1_000_000]  # ~15 s of work on 2 quiet cores: the interrupt lands mid-run
    print("start", flush=True)
    try:
        model.predict(rows, fhe="execute", workers=2)
        print("finished", flush=True)
    except KeyboardInterrupt:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")]
        kids = []
        for p in pids:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        kids.append(p)
            except OSError:
                pass
        print("interrupted; children alive:", len(kids), flush=True)
        # the next call on the same executor must not see the interrupted run's replies
        small = X[:5000]
        agree = np.mean(model.predict(np.vstack([small, small]), fhe="execute", workers=2)
                        == model.predict(np.vstack([small, small])))
        print("agreement", agree, flush=True)
""")


@pytest.mark.timeout(240)
def test_an_interrupt_in_the_parent_leaves_no_workers_and_no_stale_replies(tmp_path):
    """SIGINT to the parent only (as a notebook's interrupt button does): KeyboardInterrupt reaches
    the caller after the workers are gone, and the next prediction is right."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _children(proc.pid):
            time.sleep(0.2)
        time.sleep(1.0)  # workers started and busy with chunks
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted; children alive: 0" in out, (out, err[-2000:])
    assert "agreement 1.0" in out, (out, err[-2000:])


def _children(pid: int) -> list[int]:
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p))
        except OSError:
            pass
    return kids


@pytest.mark.timeout(200)
def test_python_dash_c_predicts_more_rows_than_one_chunk(tmp_path):
    code = ("import numpy as np; from sklearn.datasets import load_digits; from veil.ml import LogisticRegression; "
            "X, y = load_digits(return_X_y=True); m = LogisticRegression(max_iter=2000).fit(X, y).compile(X); "
            "r = np.tile(X, (12, 1))[:20000]; "
            "print('agreement', np.mean(m.predict(r, fhe='execute', workers=2) == m.predict(r)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["agreement", "1.0"], out.stdout


@pytest.mark.timeout(200)
def test_worker_command_lines_environments_and_files_hold_no_secret_key(digits_model, tmp_path):
    """What other processes of the machine can list (/proc/PID/cmdline, environ, open files) holds
    no part of the secret key: it crosses the worker's stdin pipe only."""
    args = setup(digits_model)
    secret = args["keys"]["batch"]
    probes = {secret[i:i + 32] for i in range(0, len(secret) - 32, max(1, len(secret) // 64))}
    probes |= {p.hex().encode() for p in list(probes)[:8]}
    with ChunkedExecutor(**args) as ex:
        ex.run(resampled(2 * SLOTS), "batch", chunk_rows=SLOTS, progress=False)
        pids = [w.proc.pid for w in ex._pool.workers]
        seen = b""
        files = []
        for pid in pids:
            for name in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    seen += f.read()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    files.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    assert len(pids) == 2
    assert not any(p in seen for p in probes)
    regular = [f for f in files if f.startswith("/") and not f.startswith(("/dev/", "/proc/"))
               and not f.endswith((".so", ".py", ".pyc")) and ".so." not in f]
    assert regular == [], regular  # pipes, /dev/null and libraries only: no key file


NOISY_START = textwrap.dedent("""
    import numpy as np
    from sklearn.datasets import load_digits
    from veil.ml import LogisticRegression

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X, y).compile(X)
    rows = np.tile(X, (12, 1))[:20_000]
    try:
        print("agreement", np.mean(model.predict(rows, fhe="execute", workers=2) == model.predict(rows)))
    except Exception as exc:
        print("error:", exc)
""")


@pytest.mark.timeout(200)
def test_a_worker_whose_interpreter_prints_at_start_works_or_says_so(tmp_path):
    (tmp_path / "sitecustomize.py").write_text('print("debugger attached")\n')
    script = tmp_path / "noisy.py"
    script.write_text(NOISY_START)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "agreement 1.0", last
