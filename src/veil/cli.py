"""The `veil` command: demo, serve, worker, token, deploy, keygen, predict, openapi, tee, bench, fl, mpc.

The serving commands are `veil.serve.cli`'s, federated learning's `veil.fl.cli`'s and MPC's
`veil.mpc.cli`'s; this module mounts them beside demo, tee and bench."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import veil
from veil.errors import VeilError

DATASETS = ("iris", "wine", "breast_cancer", "digits")


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
    from veil.serve import Client
    from veil.serve.server import serve_deployed

    with (tempfile.TemporaryDirectory() as data, serve_deployed(data, path, "demo", "demo") as (url, user),
          Client(url, user) as client):
        version, mc = client.model("demo")
        return _demo_steps(args, model, mc, X_test, y_test, t_fit, f"server at {url}", ("register", client.register),
                           ("HTTP round trip + evaluation",
                            lambda request, key_id: client.send("demo", version, key_id, request)))


def _demo_local(args: argparse.Namespace, model: object, path: str, X_test: np.ndarray, y_test: np.ndarray,
                t_fit: float) -> int:
    from veil import ml

    server = ml.ModelServer.load(path)
    return _demo_steps(args, model, ml.ModelClient.load(path), X_test, y_test, t_fit, "server in-process",
                       ("load", server.load_bundle), ("evaluate on ciphertexts", server.run))


def _demo_steps(args: argparse.Namespace, model: object, mc: Any, X_test: np.ndarray, y_test: np.ndarray,
                t_fit: float, where: str, register: tuple[str, Callable[[bytes], Any]],
                run: tuple[str, Callable[[bytes, Any], bytes]]) -> int:
    """The demo's client steps, each timed, with the server reached in-process or over HTTP through
    `register` (the public bundle, once, to a handle) and `run` (a request and that handle to the
    response), each given with its name in the report."""
    print(f"veil {veil.__version__} demo: LogisticRegression on {args.dataset} "
          f"({len(X_test)} test rows, {X_test.shape[1]} features), {where}")
    print(f"fit + compile: {t_fit * 1e3:.0f} ms")
    layout = args.layout if args.layout != "auto" else mc.choose_layout(len(X_test))
    t = time.perf_counter()
    bundle = mc.public_bundle_bytes(layout)
    handle = register[1](bundle)
    t_keys = time.perf_counter() - t
    t = time.perf_counter()
    _, request = mc.encrypt(X_test, layout)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    response = run[1](request, handle)
    t_srv = time.perf_counter() - t
    t = time.perf_counter()
    pred = mc.predict(mc.decrypt(response, len(X_test)))
    t_dec = time.perf_counter() - t
    p = mc.circuit.params[layout]
    print(f"CKKS N={p.poly_modulus_degree}, modulus {list(p.coeff_modulus_bits)} bits, 128-bit security, "
          f"{layout} layout")
    rows = [(f"keygen + {register[0]} public bundle (once)", t_keys, len(bundle), "public bundle, sent once"),
            ("encrypt + serialize (client)", t_enc, len(request), "request: ciphertexts only"),
            (f"{run[0]} (server)", t_srv, len(response), "response: ciphertexts only"),
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


def build_parser() -> argparse.ArgumentParser:
    from veil.fl import cli as fl_cli
    from veil.mpc import cli as mpc_cli
    from veil.serve import cli as serve_cli

    parser = argparse.ArgumentParser(prog="veil", description=__doc__)
    parser.add_argument("--version", action="version", version=f"veil {veil.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="encrypted inference end to end on a bundled dataset")
    demo.add_argument("--dataset", choices=DATASETS, default="iris")
    demo.add_argument("--layout", choices=("auto", "batch", "row"), default="auto")
    demo.add_argument("--local", action="store_true", help="server in-process instead of over HTTP")
    demo.set_defaults(func=_demo)

    serve_cli.add_parsers(sub)

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

    fl_cli.add_parser(sub)
    mpc_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from veil.serve.cli import token_compat

    args = build_parser().parse_args(token_compat(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args))
    except (VeilError, OSError, ValueError) as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
