"""The serving commands of `veil`: serve, worker, token, deploy, keygen, predict, openapi.

Each ``add_*`` function builds one subcommand on an argparse sub-parsers object, its handler set
as ``func``; `add_parsers` adds them all. The `veil` command (`veil.cli`) mounts them as it mounts
`veil.fl.cli` and `veil.mpc.cli`. The options of `veil worker` are defined once, in
`veil.serve.tee_setup.add_worker_options`, which ``python -m veil.serve.worker`` reads too.

Light to import (no FastAPI, no Redis, no numpy): the handlers import the server, the client and
the backend they run, so ``veil --help`` and ``veil token`` load none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.errors import VeilError
from veil.serve.backends import BACKENDS

if TYPE_CHECKING:
    import numpy as np

    from veil.serve.client import Client
    from veil.serve.server import ServerConfig

TOKEN_ENV = "VEIL_TOKEN"
TEE_OPTIONS = ("attest_policy", "attest", "attest_provider", "dcap_collateral", "pccs_url", "nonce_ttl")
"""`ServerConfig` fields `veil serve` sets from the trusted-execution options of the same name."""
TOKEN_ACTIONS = ("add", "revoke", "list")


def add_parsers(subparsers: Any) -> None:
    """Add serve, worker, token, deploy, keygen, predict and openapi to `subparsers`."""
    for add in (add_serve, add_worker, add_token, add_deploy, add_keygen, add_predict, add_openapi):
        add(subparsers)


def add_serve(subparsers: Any) -> argparse.ArgumentParser:
    """`veil serve`: the HTTP inference server on the backend ``--backend`` names."""
    p = subparsers.add_parser("serve", help="run the HTTP inference server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default="veil-data")
    p.add_argument("--tokens", help="tokens file (default DATA_DIR/tokens.json)")
    p.add_argument("--model-key-file", help="32-byte AES key (hex or base64); or VEIL_MODEL_KEY(_FILE)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--max-body-mb", type=float, default=256.0)
    p.add_argument("--max-buffered-mb", type=_positive_float,
                   help="MiB of request bodies held at once in all, else 503 (default 4 x --max-body-mb)")
    p.add_argument("--max-buffered-mb-per-token", type=_positive_float,
                   help="MiB of request bodies held at once for one token, else 429 (default half the above)")
    p.add_argument("--body-timeout", type=_positive_float,
                   help="seconds a request body may take to arrive after its headers, else 408 (default 120)")
    p.add_argument("--head-timeout", type=_positive_float,
                   help="seconds a request's line and headers may take to arrive, else 408 and the connection "
                        "closes (default 20)")
    p.add_argument("--backend", choices=sorted(BACKENDS),
                   help="where registries live and predictions run: local (SQLite in --data-dir, this process) "
                        "or redis (Redis at --queue, `veil worker` processes); default redis with --queue, "
                        "else local")
    p.add_argument("--queue", help="Redis URL of the redis backend: redis://[:password@]host:port/db or "
                                   "rediss://... (TLS); requests go on a Redis stream of workers")
    p.add_argument("--log-level", default="info")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP on a non-loopback address (TLS terminated in front of the server)")
    p.add_argument("--protect-metrics", action="store_true", help="/metrics requires a bearer token")
    p.add_argument("--protect-docs", action="store_true",
                   help="/docs, /redoc and /openapi.json require a bearer token")
    p.add_argument("--max-keys", type=_non_negative,
                   help="key bundles one principal may store (default 64; a token may set its own)")
    p.add_argument("--max-key-mb", type=_non_negative_float,
                   help="MiB of key bundles one principal may store (default 256)")
    _add_tee_server_options(p)
    p.set_defaults(func=_serve)
    return p


def _add_tee_server_options(p: argparse.ArgumentParser) -> None:
    from veil.tee.providers import PROVIDERS

    group = p.add_argument_group("trusted execution")
    group.add_argument("--attest-policy", metavar="FILE",
                       help="release the model key to workers (veil worker --attest) whose evidence this policy "
                            "accepts")
    group.add_argument("--attest-verifier", action="append", default=[], metavar="PLATFORM=MODULE:FACTORY",
                       help="a verifier plug-in for the policy (development and tests); repeatable")
    group.add_argument("--attest", choices=sorted(PROVIDERS),
                       help="this server runs in an enclave of this platform: it attests to clients (bound to "
                            "its TLS key) and serves /predict/plain")
    group.add_argument("--attest-provider", metavar="MODULE:FACTORY",
                       help="evidence provider plug-in instead of the device (development and tests)")
    group.add_argument("--dcap-collateral", metavar="FILE", help="Intel collateral JSON for SGX/TDX evidence")
    group.add_argument("--pccs-url", metavar="URL", help="PCCS (or Intel PCS) to fetch SGX/TDX collateral from")
    group.add_argument("--nonce-ttl", type=_positive_float, help="seconds a key-release nonce lives (default 60)")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` of parsed `veil serve` options (unset optional ones keep their defaults)."""
    from veil.serve.server import ServerConfig

    optional = {k: v for k, v in (("max_keys", args.max_keys), ("max_key_bytes", _mib(args.max_key_mb)),
                                ("body_timeout", args.body_timeout), ("head_timeout", args.head_timeout),
                                ("max_buffered", _mib(args.max_buffered_mb)),
                                ("max_buffered_per_token", _mib(args.max_buffered_mb_per_token)),
                                *((k, getattr(args, k)) for k in TEE_OPTIONS))
                if v is not None}
    return ServerConfig(host=args.host, port=args.port, data_dir=args.data_dir, tokens_file=args.tokens,
                        model_key_file=args.model_key_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_client_ca=args.tls_client_ca, max_body=int(args.max_body_mb * 1024 * 1024),
                        backend=args.backend, queue=args.queue, log_level=args.log_level, insecure=args.insecure,
                        protect_metrics=args.protect_metrics, protect_docs=args.protect_docs,
                        attest_verifiers=tuple(args.attest_verifier), **optional)


def _serve(args: argparse.Namespace) -> int:
    from veil.serve.server import serve

    serve(_server_config(args))
    return 0


def add_worker(subparsers: Any) -> argparse.ArgumentParser:
    """`veil worker`: a consumer of the redis backend's queue (options: `tee_setup.add_worker_options`)."""
    from veil.serve.tee_setup import add_worker_options

    p = subparsers.add_parser("worker", help="consume prediction jobs from the Redis queue (redis backend)")
    add_worker_options(p)
    p.set_defaults(func=_worker)
    return p


def _worker(args: argparse.Namespace) -> int:
    from veil.serve.worker import run_from_args

    return run_from_args(args)


def add_token(subparsers: Any) -> argparse.ArgumentParser:
    """`veil token add|revoke|list`: the bearer tokens file a running server follows."""
    from veil.serve.auth import ROLES

    token = subparsers.add_parser("token", help="add, revoke or list bearer tokens (a running server follows the file)")
    actions = token.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a token (printed once, stored as a hash)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="client",
                     help="admin deploys; client registers keys and predicts; worker only gets the model key by "
                          "attested key release")
    add.add_argument("--max-keys", type=_non_negative, help="this token's key bundle quota (default: server's)")
    add.add_argument("--max-key-mb", type=_non_negative_float, help="this token's key storage quota in MiB")
    revoke = actions.add_parser("revoke", help="remove tokens by name, or by the id `veil token list` shows")
    revoke.add_argument("which", help="token name or id")
    listing = actions.add_parser("list", help="names, roles, ids and quotas (never the tokens)")
    for p in (add, revoke, listing):
        p.add_argument("--data-dir", default="veil-data")
        p.add_argument("--tokens", help="tokens file (default DATA_DIR/tokens.json)")
    token.set_defaults(func=_token)
    return token


def token_compat(argv: list[str]) -> list[str]:
    """`veil token NAME ...` (before add|revoke|list existed) still means `veil token add NAME ...`."""
    if len(argv) >= 2 and argv[0] == "token" and argv[1] not in (*TOKEN_ACTIONS, "-h", "--help"):
        return ["token", "add", *argv[1:]]
    return argv


def _token(args: argparse.Namespace) -> int:
    """add: print a new token once (its hash is stored); revoke: remove tokens by name or id;
    list: names, roles, ids and quotas, never tokens. A running server follows the file."""
    from veil.serve.auth import add_token_to_file, list_tokens, revoke_tokens

    path = args.tokens or str(Path(args.data_dir) / "tokens.json")
    if args.action == "add":
        print(add_token_to_file(path, args.name, args.role, args.max_keys, _mib(args.max_key_mb)))
    elif args.action == "revoke":
        removed = revoke_tokens(path, args.which)
        if not removed:
            raise VeilError(f"no token named {args.which!r} or with that id in {path}")
        for row in removed:
            print(f"revoked {row['name']} ({row['role']}, id {row['sha256'][:12]})")
    else:
        for row in list_tokens(path):
            quota = "".join(f"  {k}={row[k]}" for k in ("max_keys", "max_key_bytes") if row[k] is not None)
            print(f"{row['id']}  {row['role']:6s} {row['name']}{quota}")
    return 0


def add_client_options(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: the options of every client command."""
    p.add_argument("--server", required=True, help="https://host:port")
    p.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    p.add_argument("--ca", help="CA bundle to verify the server")
    p.add_argument("--cert", help="client certificate for mutual TLS")
    p.add_argument("--key", help="client certificate key")


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Client]:
    """The `veil.serve.Client` that `add_client_options` describe (the token from ``$VEIL_TOKEN`` if
    unset), open for one command: a server that cannot be reached (refused, timed out, TLS
    failure) is a `VeilError` naming it, so the command prints one line instead of a traceback."""
    import httpx

    from veil.serve.client import Client

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise VeilError(f"a token is needed: --token or {TOKEN_ENV}")
    try:
        with Client(args.server, token, verify=args.ca or True,
                    cert=(args.cert, args.key) if args.cert else None) as client:
            yield client
    except httpx.TransportError as exc:
        raise VeilError(f"cannot reach {args.server}: {type(exc).__name__}: {exc}") from None


def add_deploy(subparsers: Any) -> argparse.ArgumentParser:
    """`veil deploy`: upload a saved model (admin token)."""
    p = subparsers.add_parser("deploy", help="upload a model saved by veil.ml (admin token)")
    p.add_argument("model_dir")
    p.add_argument("--name")
    p.add_argument("--version", type=int)
    add_client_options(p)
    p.set_defaults(func=_deploy)
    return p


def _deploy(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.deploy(args.model_dir, args.name or Path(args.model_dir).resolve().name, args.version)
    print(json.dumps(info))
    return 0


def add_keygen(subparsers: Any) -> argparse.ArgumentParser:
    """`veil keygen`: make a deployed model's keys, keep the secret ones on disk, register the public ones."""
    p = subparsers.add_parser("keygen", help="make and register keys for a model; secret keys stay on disk")
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--out", default="veil-keys")
    add_client_options(p)
    p.set_defaults(func=_keygen)
    return p


def _keygen(args: argparse.Namespace) -> int:
    """Generate the client's keys for a deployed model, keep the secret part on disk (0600) and
    register the public bundles."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        version, mc = client.model(args.model, args.version)
        for layout in sorted(mc.circuit.params):
            keys = mc.keys(layout)
            path = out / f"{layout}.key"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(keys.to_bytes())
            bundle = mc.public_bundle_bytes(layout)
            key_id = client.register(bundle)
            print(f"{args.model} v{version} {layout}: key id {key_id}, public bundle "
                  f"{len(bundle) / 1e6:.1f} MB, secret key in {path}")
    return 0


def add_predict(subparsers: Any) -> argparse.ArgumentParser:
    """`veil predict`: encrypt a CSV, predict on the server, write the decrypted results."""
    p = subparsers.add_parser("predict", help="encrypt a CSV, predict on the server, write decrypted results")
    p.add_argument("data", help="CSV of features (a header row is skipped)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--layout", choices=("auto", "batch", "row"), default="auto")
    p.add_argument("--keys", help="directory written by `veil keygen`")
    p.add_argument("--out", help="output CSV (default stdout)")
    p.add_argument("--proba", action="store_true", help="add class probabilities")
    p.add_argument("--chunk-size", type=int,
                   help="rows per request (default: as many as keep a request under 64 MiB for this model, "
                        "at most 16384)")
    p.add_argument("--quiet", action="store_true")
    add_client_options(p)
    p.set_defaults(func=_predict)
    return p


def _read_csv(path: str) -> np.ndarray:
    import numpy as np

    with open(path) as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    data = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    if data.size == 0:
        raise VeilError(f"{path} holds no rows")
    return data


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from veil.he import SecretKeys

    X = _read_csv(args.data)
    with _client(args) as client:
        client.chunk_size = args.chunk_size
        _, mc = client.model(args.model, args.version)
        chunk = client.chunk_rows(mc, args.layout)
        if args.keys:
            # A --keys naming no key of this model (a typo, another model's directory) is refused:
            # predicting on would silently make and register a fresh bundle under the quota.
            found = [path for path in (Path(args.keys) / f"{layout}.key" for layout in mc.circuit.params)
                     if path.is_file()]
            if not found:
                raise VeilError(f"--keys {args.keys}: no key file of model {args.model!r} there "
                                f"({', '.join(f'{layout}.key' for layout in mc.circuit.params)}); "
                                "make them with `veil keygen --out DIR`")
            for path in found:
                mc.circuit.set_keys(path.stem, SecretKeys.from_bytes(path.read_bytes()))
        with tqdm(total=len(X), unit="rows", disable=args.quiet or len(X) < 2 * chunk,
                  file=sys.stderr) as bar:
            raw = client.predict_raw(X, args.model, args.version, args.layout, progress=bar.update)
    pred = mc.predict(raw)
    columns = [pred.reshape(len(X), -1)]
    header = ["prediction"] if pred.ndim == 1 else [f"prediction_{i}" for i in range(pred.shape[1])]
    if args.proba:
        columns.append(mc.predict_proba(raw))
        header += [f"proba_{c}" for c in mc.output.classes]
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - stdout is not ours to close
    try:
        out.write(",".join(header) + "\n")
        for i in range(len(X)):
            out.write(",".join(_cell(v) for column in columns for v in column[i]) + "\n")
    finally:
        if args.out:
            out.close()
    return 0


def _cell(value: object) -> str:
    """One CSV cell in the value's own type: columns are written apart, so integer class labels stay
    integers (`1`, not `1.0` as a table upcast to float would print)."""
    return str(value.item() if hasattr(value, "item") else value)


def add_openapi(subparsers: Any) -> argparse.ArgumentParser:
    """`veil openapi`: the server's OpenAPI schema, without starting a server."""
    p = subparsers.add_parser("openapi", help="print the server's OpenAPI schema")
    p.add_argument("--out")
    p.set_defaults(func=_openapi)
    return p


def _openapi(args: argparse.Namespace) -> int:
    from veil.serve.app import openapi_schema

    text = json.dumps(openapi_schema(), indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _mib(value: float | None) -> int | None:
    return None if value is None else int(value * 1024 * 1024)


def _non_negative(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value
