"""The `veil` command: demo, serve, worker, deploy, predict, keygen, token, openapi, bench, tee."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import veil
from veil.errors import VeilError

DATASETS = ("iris", "wine", "breast_cancer", "digits")
TOKEN_ENV = "VEIL_TOKEN"
TEE_OPTIONS = ("attest_policy", "attest", "attest_provider", "dcap_collateral", "pccs_url", "nonce_ttl")
"""`ServerConfig` fields set from options of the same name (serve: all; worker: its own attestation)."""


def _demo(args: argparse.Namespace) -> int:
    """Train, compile, then run the client/server split on ciphertexts and report what moved."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from veil import ml

    X, y = getattr(datasets, f"load_{args.dataset}")(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    t0 = time.perf_counter()
    model = ml.LogisticRegression(max_iter=5000).fit(X_train, y_train).compile(X_train)
    t_fit = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        if args.local:
            return _demo_local(args, model, tmp, X_test, y_test, t_fit)
        return _demo_http(args, model, tmp, X_test, y_test, t_fit)


def _demo_http(args: argparse.Namespace, model: object, path: str, X_test: np.ndarray, y_test: np.ndarray,
               t_fit: float) -> int:
    """The same flow through a real (plain HTTP) server on a free loopback port, started and stopped here."""
    from veil.serve import Client, ServerConfig
    from veil.serve.auth import add_token_to_file
    from veil.serve.server import serve_in_background

    with tempfile.TemporaryDirectory() as data:
        admin = add_token_to_file(Path(data) / "tokens.json", "admin", "admin")
        user = add_token_to_file(Path(data) / "tokens.json", "demo", "client")
        key_file = Path(data) / "model.key"
        key_file.write_text(os.urandom(32).hex())
        with serve_in_background(ServerConfig(data_dir=data, model_key_file=str(key_file))) as url:
            with Client(url, admin) as a:
                a.deploy(path, "demo")
            with Client(url, user) as client:
                print(f"veil {veil.__version__} demo: LogisticRegression on {args.dataset} "
                      f"({len(X_test)} test rows, {X_test.shape[1]} features), server at {url}")
                print(f"fit + compile: {t_fit * 1e3:.0f} ms")
                version, mc = client.model("demo")
                layout = args.layout if args.layout != "auto" else mc.choose_layout(len(X_test))
                t = time.perf_counter()
                bundle = mc.public_bundle_bytes(layout)
                key_id = client.register(bundle)
                t_reg = time.perf_counter() - t
                t = time.perf_counter()
                _, request = mc.encrypt(X_test, layout)
                t_enc = time.perf_counter() - t
                t = time.perf_counter()
                response = client.send("demo", version, key_id, request)
                t_srv = time.perf_counter() - t
                t = time.perf_counter()
                pred = mc.predict(mc.decrypt(response, len(X_test)))
                t_dec = time.perf_counter() - t
    p = mc.circuit.params[layout]
    print(f"CKKS N={p.poly_modulus_degree}, modulus {list(p.coeff_modulus_bits)} bits, 128-bit security, "
          f"{layout} layout")
    rows = [("keygen + register public bundle (once)", t_reg, len(bundle), "public bundle, sent once"),
            ("encrypt + serialize (client)", t_enc, len(request), "request: ciphertexts only"),
            ("HTTP round trip + evaluation (server)", t_srv, len(response), "response: ciphertexts only"),
            ("decrypt + decode (client)", t_dec, 0, "")]
    return _report(rows, t_enc + t_srv + t_dec, pred, model, X_test, y_test)


def _demo_local(args: argparse.Namespace, model: object, path: str, X_test: np.ndarray, y_test: np.ndarray,
                t_fit: float) -> int:
    from veil import ml

    server, client = ml.ModelServer.load(path), ml.ModelClient.load(path)
    print(f"veil {veil.__version__} demo: LogisticRegression on {args.dataset} "
          f"({len(X_test)} test rows, {X_test.shape[1]} features), server in-process")
    print(f"fit + compile: {t_fit * 1e3:.0f} ms")
    t = time.perf_counter()
    layout = args.layout if args.layout != "auto" else client.choose_layout(len(X_test))
    bundle_bytes = client.public_bundle_bytes(layout)
    bundle = server.load_bundle(bundle_bytes)
    t_keys = time.perf_counter() - t
    t = time.perf_counter()
    _, request = client.encrypt(X_test, layout)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    response = server.run(request, bundle)
    t_srv = time.perf_counter() - t
    t = time.perf_counter()
    pred = client.predict(client.decrypt(response, len(X_test)))
    t_dec = time.perf_counter() - t
    rows = [("keygen + load public bundle (once)", t_keys, len(bundle_bytes), "public bundle, sent once"),
            ("encrypt + serialize (client)", t_enc, len(request), "request: ciphertexts only"),
            ("evaluate on ciphertexts (server)", t_srv, len(response), "response: ciphertexts only"),
            ("decrypt + decode (client)", t_dec, 0, "")]
    return _report(rows, t_enc + t_srv + t_dec, pred, model, X_test, y_test)


def _report(rows: list, total: float, pred: np.ndarray, model: object, X_test: np.ndarray,
            y_test: np.ndarray) -> int:
    for name, secs, nbytes, what in rows:
        size = f"{nbytes / 1024:9.1f} kB  {what}" if nbytes else ""
        print(f"  {name:40s} {secs * 1e3:8.1f} ms  {size}")
    print(f"end to end: {total * 1e3:.1f} ms for {len(X_test)} samples ({len(X_test) / total:,.0f} samples/s)")
    plain = model.predict(X_test)
    agree = float(np.mean(pred == plain))
    print(f"accuracy: encrypted {np.mean(pred == y_test):.4f}, plaintext {np.mean(plain == y_test):.4f}; "
          f"encrypted predictions equal plaintext on {agree:.2%} of samples")
    return 0 if agree >= 0.995 else 1


def _server_config(args: argparse.Namespace) -> veil.serve.ServerConfig:
    from veil.serve import ServerConfig

    optional = {k: v for k, v in (("max_keys", args.max_keys), ("max_key_bytes", _mb(args.max_key_mb)),
                                ("body_timeout", args.body_timeout), ("head_timeout", args.head_timeout),
                                *((k, getattr(args, k, None)) for k in TEE_OPTIONS))
                if v is not None}
    return ServerConfig(host=args.host, port=args.port, data_dir=args.data_dir, tokens_file=args.tokens,
                        model_key_file=args.model_key_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_client_ca=args.tls_client_ca, max_body=int(args.max_body_mb * 1024 * 1024),
                        queue=args.queue, log_level=args.log_level, insecure=args.insecure,
                        protect_metrics=args.protect_metrics, protect_docs=args.protect_docs,
                        attest_verifiers=tuple(getattr(args, "attest_verifier", None) or ()), **optional)


def _mb(value: float | None) -> int | None:
    return None if value is None else int(value * 1024 * 1024)


def _serve(args: argparse.Namespace) -> int:
    from veil.serve import serve

    serve(_server_config(args))
    return 0


def _token(args: argparse.Namespace) -> int:
    """add: print a new token once (its hash is stored); revoke: remove tokens by name or id;
    list: names, roles, ids and quotas, never tokens. A running server follows the file."""
    from veil.serve.auth import add_token_to_file, list_tokens, revoke_tokens

    path = args.tokens or str(Path(args.data_dir) / "tokens.json")
    if args.action == "add":
        print(add_token_to_file(path, args.name, args.role, args.max_keys, _mb(args.max_key_mb)))
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


def _client(args: argparse.Namespace) -> veil.serve.Client:
    from veil.serve import Client

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise VeilError(f"a token is needed: --token or {TOKEN_ENV}")
    return Client(args.server, token, verify=args.ca or True, cert=(args.cert, args.key) if args.cert else None)


def _deploy(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.deploy(args.model_dir, args.name or Path(args.model_dir).resolve().name, args.version)
    print(json.dumps(info))
    return 0


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


def _read_csv(path: str) -> np.ndarray:
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
            for layout in mc.circuit.params:
                path = Path(args.keys) / f"{layout}.key"
                if path.exists():
                    mc.circuit.set_keys(layout, SecretKeys.from_bytes(path.read_bytes()))
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


def _openapi(args: argparse.Namespace) -> int:
    from veil.serve.app import openapi_schema

    text = json.dumps(openapi_schema(), indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from veil.serve.worker import run_from_args

    return run_from_args(args)


def _tee_manifest(args: argparse.Namespace) -> int:
    """Write the enclave description of `veil worker` (the files `veil.tee.manifest` makes) into --out."""
    from veil.tee.manifest import gramine_manifest, nitro_build_commands, nitro_dockerfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worker_args = ["--queue", args.queue, "--attest", "sgx" if args.platform == "gramine" else "nitro",
                   "--key-broker", args.key_broker, "--key-broker-token-file", args.token_file]
    if args.key_broker_ca:
        worker_args += ["--key-broker-ca", args.key_broker_ca]
    if args.platform == "gramine":
        if args.pccs_url:
            worker_args += ["--pccs-url", args.pccs_url]
        written = {"veil-worker.manifest.template": gramine_manifest(
            worker_args=worker_args, model_dir=args.model_dir,
            extra_trusted=[p for p in (args.key_broker_ca,) if p], extra_allowed=[args.token_file])}
    else:
        written = {"Dockerfile": nitro_dockerfile(worker_args=worker_args,
                                                  extra_files=[("worker.token", args.token_file)]),
                   "build.sh": "#!/bin/sh\nset -eu\n" + "\n".join(nitro_build_commands()) + "\n"}
    for name, text in written.items():
        (out / name).write_text(text)
        print(out / name)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Measure plaintext, HE, MPC, federated learning and TEE side by side (see `veil.bench`)."""
    from veil.bench import BenchConfig, run_bench

    models = (args.model,) if args.model else BenchConfig.models
    run_bench(BenchConfig(dataset=args.dataset, models=models, quick=args.quick, out=args.out,
                          progress=not args.quiet, attest_policy=args.attest_policy), echo=print)
    return 0


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default="veil-data")
    p.add_argument("--tokens", help="tokens file (default DATA_DIR/tokens.json)")
    p.add_argument("--model-key-file", help="32-byte AES key (hex or base64); or VEIL_MODEL_KEY(_FILE)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--max-body-mb", type=float, default=256.0)
    p.add_argument("--body-timeout", type=_positive_float,
                   help="seconds a request body may take to arrive after its headers, else 408 (default 120)")
    p.add_argument("--head-timeout", type=_positive_float,
                   help="seconds a request's line and headers may take to arrive, else 408 and the connection "
                        "closes (default 20)")
    p.add_argument("--queue", help="redis://[:password@]host:port/db or rediss://... (TLS): serve through a "
                                   "Redis stream of workers")
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


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="https://host:port")
    p.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    p.add_argument("--ca", help="CA bundle to verify the server")
    p.add_argument("--cert", help="client certificate for mutual TLS")
    p.add_argument("--key", help="client certificate key")


def build_parser() -> argparse.ArgumentParser:
    from veil.serve.auth import ROLES

    parser = argparse.ArgumentParser(prog="veil", description=__doc__)
    parser.add_argument("--version", action="version", version=f"veil {veil.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="encrypted inference end to end on a bundled dataset")
    demo.add_argument("--dataset", choices=DATASETS, default="iris")
    demo.add_argument("--layout", choices=("auto", "batch", "row"), default="auto")
    demo.add_argument("--local", action="store_true", help="server in-process instead of over HTTP")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="run the HTTP inference server")
    _add_server_options(serve)
    serve.set_defaults(func=_serve)

    _add_tee_server_options(serve)

    from veil.serve.tee_setup import add_worker_options

    worker = sub.add_parser("worker", help="consume prediction jobs from the Redis queue")
    add_worker_options(worker)
    worker.set_defaults(func=_worker)

    tee = sub.add_parser("tee", help="trusted execution: enclave descriptions for `veil worker`")
    tee_actions = tee.add_subparsers(dest="action", required=True)
    manifest = tee_actions.add_parser("manifest", help="write a Gramine manifest (SGX) or a Nitro enclave image")
    manifest.add_argument("--out", required=True, help="directory to write into")
    manifest.add_argument("--platform", choices=("gramine", "nitro"), default="gramine")
    manifest.add_argument("--queue", required=True, help="the Redis URL the enclave's worker consumes (rediss://...)")
    manifest.add_argument("--key-broker", required=True, help="URL of the front end started with --attest-policy")
    manifest.add_argument("--token-file", default="/secrets/worker.token",
                          help="where the enclave reads its worker token (an allowed file, not measured)")
    manifest.add_argument("--key-broker-ca", help="CA bundle of the key broker (measured into the enclave)")
    manifest.add_argument("--model-dir", default="/models", help="Gramine: the encrypted model store (allowed files)")
    manifest.add_argument("--pccs-url", help="Gramine: the PCCS the worker fetches its collateral from")
    manifest.set_defaults(func=_tee_manifest)

    token = sub.add_parser("token", help="add, revoke or list bearer tokens (a running server follows the file)")
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

    deploy = sub.add_parser("deploy", help="upload a model saved by veil.ml (admin token)")
    deploy.add_argument("model_dir")
    deploy.add_argument("--name")
    deploy.add_argument("--version", type=int)
    _add_client_options(deploy)
    deploy.set_defaults(func=_deploy)

    keygen = sub.add_parser("keygen", help="make and register keys for a model; secret keys stay on disk")
    keygen.add_argument("--model", required=True)
    keygen.add_argument("--version", type=int)
    keygen.add_argument("--out", default="veil-keys")
    _add_client_options(keygen)
    keygen.set_defaults(func=_keygen)

    predict = sub.add_parser("predict", help="encrypt a CSV, predict on the server, write decrypted results")
    predict.add_argument("data", help="CSV of features (a header row is skipped)")
    predict.add_argument("--model", required=True)
    predict.add_argument("--version", type=int)
    predict.add_argument("--layout", choices=("auto", "batch", "row"), default="auto")
    predict.add_argument("--keys", help="directory written by `veil keygen`")
    predict.add_argument("--out", help="output CSV (default stdout)")
    predict.add_argument("--proba", action="store_true", help="add class probabilities")
    predict.add_argument("--chunk-size", type=int,
                         help="rows per request (default: as many as keep a request under 64 MiB "
                              "for this model, at most 16384)")
    predict.add_argument("--quiet", action="store_true")
    _add_client_options(predict)
    predict.set_defaults(func=_predict)

    openapi = sub.add_parser("openapi", help="print the server's OpenAPI schema")
    openapi.add_argument("--out")
    openapi.set_defaults(func=_openapi)

    bench = sub.add_parser("bench", help="measure plaintext, HE, MPC, federated learning and TEE side by side")
    bench.add_argument("--quick", action="store_true", help="fewer epochs, rounds and samples (under 3 minutes)")
    bench.add_argument("--dataset", default="digits",
                       help="scikit-learn dataset (digits, iris, wine, breast_cancer) or an .npz file with X and y")
    bench.add_argument("--model", choices=("logreg", "mlp"), help="measure only this model (default: both)")
    bench.add_argument("--out", default="bench-results", help="directory for bench.json, bench.md and bench.png")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--attest-policy", metavar="FILE",
                       help="inside an enclave or confidential VM: a policy trusting it, to measure the TEE row")
    bench.set_defaults(func=_bench)

    from veil.fl import cli as fl_cli
    from veil.mpc import cli as mpc_cli

    fl_cli.add_parser(sub)
    mpc_cli.add_parser(sub)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value


def _compat(argv: list[str]) -> list[str]:
    """`veil token NAME ...` (before add|revoke|list existed) still means `veil token add NAME ...`."""
    if len(argv) >= 2 and argv[0] == "token" and argv[1] not in ("add", "revoke", "list", "-h", "--help"):
        return ["token", "add", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_compat(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args))
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
