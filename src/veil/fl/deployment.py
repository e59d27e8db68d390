"""Flower's deployment engine on this machine: one SuperLink and one SuperNode per data owner,
each a separate process on loopback, optionally over TLS, and `flwr run` to submit the app."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veil.fl.checkpoint import PROGRESS_FILE, load_result
from veil.fl.config import FLConfig, FLResult
from veil.fl.simulation import FederationError, offline_env
from veil.net import free_port

APP_NAME = "veilfl"


def make_tls(directory: Path) -> dict[str, Path]:
    """A fresh CA and a SuperLink certificate for 127.0.0.1 (keys from the OS CSPRNG via `cryptography`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def cert(name: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil fl CA")])
    paths = {"ca": directory / "ca.pem", "cert": directory / "superlink.pem", "key": directory / "superlink.key"}
    paths["ca"].write_bytes(cert("veil fl CA", ca_key, ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert("127.0.0.1", key, ca_name, ca_key, False).public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_app(directory: Path, config: FLConfig) -> Path:
    """A Flower App directory whose components are `veil.fl.app` and whose run config is `config`."""
    directory.mkdir(parents=True, exist_ok=True)
    run_config = "\n".join(f"{k} = {_toml(v)}" for k, v in config.to_run_config().items())
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "veil federated learning app (generated)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "veil"

[tool.flwr.app.components]
serverapp = "veil.fl.app:server_app"
clientapp = "veil.fl.app:client_app"

[tool.flwr.app.config]
{run_config}
""")
    return directory


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """Terminate a process and all its descendants (SuperNodes leave `flwr-clientapp` children)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
        if not any(_alive(p) for p in tree):
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalFederation:
    """A SuperLink and `n` SuperNodes as child processes on loopback; a context manager that kills
    every process tree on exit. Logs go to `workdir/logs`."""

    def __init__(self, workdir: str | Path, n_nodes: int, tls: bool = False, dataset_clients: int | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.n_nodes, self.tls = n_nodes, tls
        self.num_partitions = dataset_clients or n_nodes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, **offline_env(self.workdir), **(extra_env or {})}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.tls_paths = make_tls(self.workdir / "tls") if tls else None

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / log_name, "ab") as log:
            proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def superlink_args(self) -> list[str]:
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls_paths:
            args += ["--ssl-certfile", str(self.tls_paths["cert"]), "--ssl-keyfile", str(self.tls_paths["key"]),
                     "--ssl-ca-certfile", str(self.tls_paths["ca"])]
        else:
            args.append("--insecure")
        return args

    def supernode_args(self, partition_id: int) -> list[str]:
        args = ["flower-supernode", "--superlink", self.address, "--port", str(free_port()),
                "--node-config", f"partition-id={partition_id} num-partitions={self.num_partitions}"]
        args += ["--root-certificates", str(self.tls_paths["ca"])] if self.tls_paths else ["--insecure"]
        return args

    def start(self, timeout: float = 60.0) -> LocalFederation:
        self._spawn(self.superlink_args(), "superlink.log")
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    self.stop()
                    raise FederationError(f"SuperLink did not start; see {self.workdir / 'logs'}") from None
                time.sleep(0.2)
        for i in range(self.n_nodes):
            self._spawn(self.supernode_args(i), f"supernode-{i}.log")
        return self

    def submit(self, config: FLConfig) -> str:
        """`flwr run` the veil app with `config` on this federation; returns the run id."""
        ca = self.tls_paths["ca"] if self.tls_paths else None
        return submit_run(self.address, config, self.workdir, ca, self.env)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise FederationError(f"{proc.args[0]} exited with code {proc.returncode}; "
                                      f"see {self.workdir / 'logs'}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def submit_run(address: str, config: FLConfig, workdir: str | Path, root_certificates: str | Path | None = None,
               env: dict[str, str] | None = None, connect_timeout: float = 60.0) -> str:
    """Submit the veil app with `config` to the SuperLink at `address` with `flwr run`; returns the run id.

    The app directory and Flower's connection file (FLWR_HOME) are written under `workdir`."""
    workdir = Path(workdir).resolve()
    env = {**os.environ, **offline_env(workdir), **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "veil"', "", "[superlink.veil]", f'address = "{address}"',
             f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    app = write_app(workdir / "app", config)
    deadline = time.monotonic() + connect_timeout
    while True:
        proc = subprocess.run(["flwr", "run", str(app), "veil", "--format", "json"], env=env, capture_output=True,
                              text=True, timeout=120, cwd=workdir)
        try:
            answer = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            answer = {}
        if proc.returncode == 0 and answer.get("success"):
            return str(answer["run-id"])
        if "unavailable" not in str(answer.get("error-message", "")) or time.monotonic() > deadline:
            raise FederationError(f"flwr run failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        time.sleep(1.0)  # the SuperLink may still be starting


def wait_for_result(out_dir: Path, rounds: int, timeout: float, on_round: Callable[[dict], None] | None = None,
                    check: Callable[[], None] | None = None) -> FLResult:
    """Follow `progress.jsonl` written by the ServerApp until `result.json` appears (or time runs out)."""
    deadline, seen = time.monotonic() + timeout, 0
    progress = out_dir / PROGRESS_FILE
    while True:
        if progress.exists():
            rows = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
            for row in rows[seen:]:
                if on_round is not None:
                    on_round(row)
            seen = max(seen, len(rows))
        if (out_dir / "result.json").exists():
            return load_result(out_dir)
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise FederationError(f"no result after {timeout:.0f} s ({seen} of {rounds + 1} evaluations seen)")
        time.sleep(0.5)


def run_deployment(config: FLConfig, workdir: str | Path, tls: bool = False, timeout: float = 900.0,
                   on_round: Callable[[dict], None] | None = None) -> FLResult:
    """Start a SuperLink and `config.clients` SuperNodes on loopback, run the app, stop everything."""
    workdir = Path(workdir).resolve()
    out = workdir / "out"
    for stale in (PROGRESS_FILE, "result.json"):
        (out / stale).unlink(missing_ok=True)
    config = FLConfig(**{**config.__dict__, "out_dir": str(out)})
    start = time.perf_counter()
    with LocalFederation(workdir, config.clients, tls=tls) as fed:
        fed.submit(config)
        result = wait_for_result(out, config.rounds, timeout, on_round, fed.check_alive)
    result.wall_time = time.perf_counter() - start
    return result
