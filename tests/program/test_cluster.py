"""`RayExecutor` on a local Ray cluster with mutual TLS, against the in-process reference path.

Ray reads its TLS variables when it is imported, so the cluster scenarios run in one child
process whose environment holds them from the start (certificates this module issues for the
node's addresses), on a local two-CPU cluster, with the digits model and chunks of one ciphertext
(4,096 rows); the tests assert on what it reports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from veil.errors import ExecutorError
from veil.program.cluster import CONNECT_TIMEOUT, RayExecutor, check_tls, local_addresses, write_dev_tls

from . import test_parallel
from .test_parallel import SLOTS, resampled

digits_model = test_parallel.digits_model  # the same module-scoped fixture


CLUSTER_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ray
    from sklearn.datasets import load_digits
    from veil.ml import LogisticRegression
    from veil.program import load_client, load_server
    from veil.program.cluster import RayExecutor

    SLOTS = 4096
    X0, y0 = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X0, y0).compile(X0)
    client = model.fhe_client
    setup = {"server_dict": model.circuit_.to_dict(), "client_spec": model.circuit_.client_spec(),
             "load_server": load_server, "load_client": load_client,
             "keys": {"batch": client.keys("batch").to_bytes()}, "layout": "batch"}

    def rows(n, seed):
        rng = np.random.default_rng(seed)
        X = X0[rng.integers(0, len(X0), n)] + rng.normal(0.0, 0.3, (n, X0.shape[1]))
        return np.clip(X, 0.0, 16.0)

    def rel_err(got, X):
        ref = client.decrypt(model.circuit_.run(client.encrypt(X, "batch"), client.public_bundle("batch")))
        return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))) if got.shape == ref.shape else 1e9

    def failure(fn):
        try:
            fn()
        except Exception as exc:
            return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                    "message": str(exc), "notes": getattr(exc, "__notes__", [])}
        return None

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {"node_ip": ray.util.get_node_ip_address()}
    X = rows(3 * SLOTS + 123, 11)
    for ship in (False, True):
        ex = RayExecutor(ship_keys=ship)
        got = ex.execute(X, **setup, chunk_rows=SLOTS)
        labels = model.predict(X[: 2 * SLOTS], fhe="execute", executor=ex)
        out[f"ship_{ship}"] = {"rel_err": rel_err(got, X), "shape": list(got.shape), "actors": len(ex._pool),
                               "agreement": float(np.mean(labels == model.predict(X[: 2 * SLOTS])))}
        ex.close()
        out[f"ship_{ship}"]["ray_still_up"] = ray.is_initialized()

    path = sys.argv[1] + "/rows.f64"
    Xm = rows(2 * SLOTS + 5, 12)
    Xm.tofile(path)
    with RayExecutor() as ex:
        got = ex.execute(np.memmap(path, dtype=np.float64, mode="r", shape=Xm.shape), **setup, chunk_rows=SLOTS)
    out["memmap_rel_err"] = rel_err(got, Xm)

    with RayExecutor(actors=1) as ex:
        ex.execute(rows(SLOTS, 13), **setup)
        (actor,) = ex._pool
        data = rows(4, 14).tobytes()
        out["keyless_actor"] = failure(lambda: ray.get(actor.run_chunk.remote("batch", data, "<f8", 64)))

    Xbad = rows(3 * SLOTS, 15)
    Xbad[SLOTS + 7, 3] = np.nan
    with RayExecutor(ship_keys=True) as ex:
        out["bad_chunk"] = failure(lambda: ex.execute(Xbad, **setup, chunk_rows=SLOTS))

    X2 = rows(2 * SLOTS, 16)
    with RayExecutor(actors=2) as ex:
        ex.execute(X2, **setup, chunk_rows=SLOTS)
        for a in ex._pool:
            ray.kill(a, no_restart=True)
        out["dead_actors"] = failure(lambda: ex.execute(X2, **setup, chunk_rows=SLOTS))
        out["pool_after_death"] = len(ex._pool)
        out["after_death_rel_err"] = rel_err(ex.execute(X2, **setup, chunk_rows=SLOTS), X2)

    def key_copies(pid, needle):  # occurrences in the process's readable memory (None: unreadable)
        count = 0
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
                for line in maps:
                    span, perms = line.split()[:2]
                    lo, hi = (int(a, 16) for a in span.split("-"))
                    if "r" not in perms or "[v" in line or hi - lo > (1 << 31):
                        continue
                    tail = b""
                    for pos in range(lo, hi, 32 << 20):
                        try:
                            mem.seek(pos)
                            buf = mem.read(min(32 << 20, hi - pos))
                        except (OSError, ValueError, OverflowError):
                            break
                        count += (tail + buf).count(needle)
                        tail = buf[-len(needle):]
        except OSError:
            return None
        return count

    raw_sk = client.keys("batch")._secret_key.to_string()
    needle = raw_sk[len(raw_sk) // 2: len(raw_sk) // 2 + 64]  # 8 coefficients of the key, as SEAL holds them
    out["key_copies"] = {}
    for ship in (False, True):
        with RayExecutor(actors=1, ship_keys=ship) as ex:
            ex.execute(rows(SLOTS + 9, 17), **setup, chunk_rows=SLOTS)
            (actor,) = ex._pool
            pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
            out["key_copies"][str(ship)] = key_copies(pid, needle)
    out["key_copies"]["driver"] = key_copies("self", needle)

    import os, socket, subprocess, urllib.error, urllib.request
    node = ray._private.worker._global_node
    agent = f"http://{node.node_ip_address}:{node.runtime_env_agent_port}/get_runtime_envs_info"
    try:
        with urllib.request.urlopen(urllib.request.Request(agent, data=b"", method="POST"), timeout=10) as r:
            out["agent_stranger"] = r.status
    except urllib.error.HTTPError as exc:
        out["agent_stranger"] = exc.code

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    rogue = {**os.environ, **json.loads(sys.argv[2])}
    PROBE = ("import json, sys, time\\n"
             "from veil.program.cluster import RayExecutor\\n"
             "t = time.monotonic()\\n"
             "try:\\n    RayExecutor(sys.argv[1])._connect()\\n    r = {'type': None}\\n"
             "except Exception as exc:\\n    r = {'type': type(exc).__name__, 'message': str(exc)}\\n"
             "r['secs'] = time.monotonic() - t\\n"
             "print('PROBE ' + json.dumps(r))\\n")
    out["strangers"] = {}
    for name, address, env in (("rogue_ca", node.gcs_address, rogue), ("closed_port", closed, os.environ),
                               ("our_ca", node.gcs_address, os.environ)):
        try:
            p = subprocess.run([sys.executable, "-c", PROBE, address], env=env, capture_output=True, text=True,
                               timeout=120)
            lines = [x for x in p.stdout.splitlines() if x.startswith("PROBE ")]
            out["strangers"][name] = json.loads(lines[-1][6:]) if lines else {"type": "no output " + p.stderr[-500:]}
        except subprocess.TimeoutExpired:
            out["strangers"][name] = {"type": "hung"}
    out["cluster_alive"] = ray.cluster_resources().get("CPU") == 2

    import torch
    from torch import nn
    from veil.ml import compile_torch_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    images = (X0 / 16.0).reshape(-1, 1, 8, 8)
    staged = compile_torch_model(net.eval(), images[:400], input_bounds=1.0, nonlinear="client")
    with torch.no_grad():
        logits = net(torch.tensor(images[1000:1200], dtype=torch.float32)).numpy()
    for ship in (False, True):
        with RayExecutor(ship_keys=ship) as ex:
            got = staged.forward(images[1000:1200], fhe="execute", executor=ex)
        out[f"staged_{ship}"] = float(np.max(np.abs(got - logits)) / np.max(np.abs(logits)))
    ray.shutdown()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """One process that sets Ray's TLS variables before importing ray, starts a local two-CPU
    cluster and runs every scenario below on it; its findings as a dict."""
    ips = local_addresses()
    env = {**os.environ, **write_dev_tls(out := tmp_path_factory.mktemp("raytls"), ips)}
    rogue = write_dev_tls(tmp_path_factory.mktemp("rogue"), ips)  # another CA's certificate, the right token
    rogue["RAY_AUTH_TOKEN_PATH"] = env["RAY_AUTH_TOKEN_PATH"]
    ray_tmp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, "-c", CLUSTER_RUN, str(out), json.dumps(rogue)], capture_output=True,
                              text=True, timeout=900, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["node_ip"] in ips, (result["node_ip"], ips)  # the certificate named the node Ray bound
    return result


def test_check_tls_names_what_is_missing(tmp_path):
    with pytest.raises(ExecutorError, match=r"RAY_USE_TLS is not 1.*RAY_TLS_SERVER_CERT is not set"):
        check_tls({})
    env = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(tmp_path / "absent.pem"),
           "RAY_TLS_SERVER_KEY": str(tmp_path / "absent.key"), "RAY_TLS_CA_CERT": str(tmp_path / "absent-ca.pem")}
    with pytest.raises(ExecutorError, match=r"absent\.pem is not a readable file"):
        check_tls(env)
    for name in ("absent.pem", "absent.key", "absent-ca.pem"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ExecutorError, match=r"RAY_AUTH_MODE is not token.*neither RAY_AUTH_TOKEN"):
        check_tls(env)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "absent-token"))
    with pytest.raises(ExecutorError, match=r"absent-token is not a readable file"):
        check_tls(env)
    (tmp_path / "absent-token").write_text("x")
    check_tls(env)
    del env["RAY_AUTH_TOKEN_PATH"]
    check_tls({**env, "RAY_AUTH_TOKEN": "x"})


def test_a_run_without_tls_is_refused_before_ray_starts(digits_model, monkeypatch):
    for name in ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
        monkeypatch.delenv(name, raising=False)
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    with pytest.raises(ExecutorError, match="mutually authenticated TLS"):
        digits_model.predict(resampled(10), fhe="execute", executor=RayExecutor())
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == running  # refused before connecting


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ship_keys", [False, True])
def test_ray_chunks_agree_with_the_in_process_path_in_order(cluster_run, ship_keys):
    got = cluster_run[f"ship_{ship_keys}"]
    assert got["shape"] == [3 * SLOTS + 123, 10]
    assert got["rel_err"] <= 1e-5  # fresh CKKS noise only; a misplaced chunk would differ by units
    assert got["agreement"] == 1.0
    assert got["actors"] == 2  # one per CPU of the cluster
    assert got["ray_still_up"], "an executor that did not start Ray must not stop it"


@pytest.mark.parametrize("ship_keys", [False, True])
def test_an_interactive_network_runs_its_stages_through_ray(cluster_run, ship_keys):
    """A ReLU/MaxPool CNN compiled with nonlinear='client': one round trip per stage, each to an
    actor (the key in the driver) or inside the actor (ship_keys), agreeing with plaintext torch."""
    assert cluster_run[f"staged_{ship_keys}"] <= 1e-3


def test_a_memmap_is_read_chunk_by_chunk(cluster_run):
    assert cluster_run["memmap_rel_err"] <= 1e-5


def test_without_ship_keys_the_actors_hold_no_client_key(cluster_run):
    failure = cluster_run["keyless_actor"]
    assert failure is not None and "ExecutorError" in failure["mro"]
    assert "holds no client keys" in failure["message"]


def test_a_chunk_failing_on_an_actor_raises_its_own_veil_error_with_its_rows(cluster_run):
    failure = cluster_run["bad_chunk"]
    assert failure is not None and failure["type"] == "ShapeError", failure
    assert any(f"rows {SLOTS}:{2 * SLOTS}" in note for note in failure["notes"]), failure


def test_dead_actors_raise_executor_error_and_the_next_run_starts_a_new_pool(cluster_run):
    failure = cluster_run["dead_actors"]
    assert failure is not None and failure["type"] == "ExecutorError" and "actor died" in failure["message"]
    assert cluster_run["pool_after_death"] == 0
    assert cluster_run["after_death_rel_err"] <= 1e-5


IMPORT_ORDER = textwrap.dedent("""
    import os, sys
    pem, order = sys.argv[1], sys.argv[2].split(",")
    for step in order:
        if step == "env":
            os.environ.update(RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=pem, RAY_TLS_SERVER_KEY=pem, RAY_TLS_CA_CERT=pem,
                              RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x")
        elif step == "ray":
            import ray
        elif step == "veil":
            from veil.program.cluster import check_tls
    from veil.errors import ExecutorError
    try:
        check_tls()
    except ExecutorError as exc:
        print("refused:", exc)
    else:
        print("accepted")
""")


@pytest.mark.parametrize(("order", "refused"), [
    ("ray,env,veil", True),  # ray read an environment without TLS; judged from the start environment
    ("veil,ray,env", True),  # seen at ray's import
    ("veil,env,ray", False),  # set before ray's import: accepted, no false refusal
    ("env,ray,veil", True)])  # unknowable once ray came first: refused (clear) rather than risk a hang
def test_tls_set_after_ray_was_imported_is_refused_not_left_hanging(tmp_path, order, refused):
    (tmp_path / "f.pem").write_text("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", IMPORT_ORDER, str(tmp_path / "f.pem"), order], capture_output=True,
                         text=True, timeout=120, env=env)
    if refused:
        assert "refused:" in out.stdout and "imported before RAY_USE_TLS" in out.stdout, out.stdout + out.stderr[-2000:]
    else:
        assert out.stdout.strip() == "accepted", out.stdout + out.stderr[-2000:]


def test_dev_tls_names_the_addresses_and_keeps_its_key_private(tmp_path):
    from cryptography import x509

    env = write_dev_tls(tmp_path / "tls", ("127.0.0.1", "10.1.2.3"))
    check_tls(env)
    assert os.stat(env["RAY_TLS_SERVER_KEY"]).st_mode & 0o077 == 0
    assert os.stat(env["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o077 == 0 and env["RAY_AUTH_MODE"] == "token"
    assert len(Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()) == 64
    node = x509.load_pem_x509_certificate(Path(env["RAY_TLS_SERVER_CERT"]).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(env["RAY_TLS_CA_CERT"]).read_bytes())
    node.verify_directly_issued_by(ca)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert "127.0.0.1" in local_addresses()


def test_without_ship_keys_no_actor_memory_holds_the_secret_key(cluster_run):
    """The actor's whole memory (what it received, built or cached) is searched for 64 bytes of
    the client's secret key; an actor given the keys (ship_keys=True) shows the search finds them."""
    copies = cluster_run["key_copies"]
    if copies["True"] is None or copies["driver"] is None:
        pytest.skip("this system does not let a process read its descendants' memory")
    assert copies["driver"] >= 1 and copies["True"] >= 1, copies
    assert copies["False"] == 0, copies


def test_the_runtime_env_agent_refuses_a_stranger(cluster_run):
    """Ray's runtime-env agent is plain HTTP on the node IP and installs whatever environment it is
    asked for; with the token authentication a run requires, a request without the token is refused."""
    assert cluster_run["agent_stranger"] == 401


@pytest.mark.parametrize("stranger", ["rogue_ca", "closed_port"])
def test_a_cluster_that_refuses_us_or_is_down_raises_executor_error_quickly(cluster_run, stranger):
    """A driver whose certificate another CA issued, and an address nothing listens on: Ray alone
    retries for ever; the executor's handshake raises ExecutorError within its timeout."""
    got = cluster_run["strangers"][stranger]
    assert got["type"] == "ExecutorError", got
    assert got["secs"] < CONNECT_TIMEOUT + 10, got
    assert cluster_run["cluster_alive"]


def test_a_second_driver_with_our_certificate_passes_the_handshake_and_connects(cluster_run):
    assert cluster_run["strangers"]["our_ca"]["type"] is None, cluster_run["strangers"]["our_ca"]


def test_a_server_whose_certificate_another_ca_issued_is_refused_in_time(tmp_path):
    """The driver's handshake authenticates the cluster too: a listener on a free loopback port
    presenting another CA's certificate (it would accept any client) is refused, not trusted."""
    import socket
    import ssl
    import threading

    from veil.program.cluster import probe_cluster

    ours = write_dev_tls(tmp_path / "ours", ("127.0.0.1",))
    theirs = write_dev_tls(tmp_path / "theirs", ("127.0.0.1",))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(theirs["RAY_TLS_SERVER_CERT"], theirs["RAY_TLS_SERVER_KEY"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn, \
                server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"\0" * 9)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(ExecutorError, match="certificate RAY_TLS_CA_CERT did not issue"):
            probe_cluster(f"127.0.0.1:{listener.getsockname()[1]}", timeout=5, environ=ours)
    finally:
        thread.join(10)
        listener.close()
    probe_cluster("auto", environ=ours)  # not host:port: left to Ray, no connection tried
