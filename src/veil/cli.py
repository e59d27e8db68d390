"""The `veil` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence

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
        server, client = ml.ModelServer.load(tmp), ml.ModelClient.load(tmp)
    print(f"veil {veil.__version__} demo: LogisticRegression on {args.dataset} "
          f"({len(X_train)} train / {len(X_test)} test rows, {X.shape[1]} features), "
          f"server in-process (the HTTP server comes with veil.serve)")
    print(f"fit + compile: {t_fit * 1e3:.0f} ms")

    t = time.perf_counter()
    layout = args.layout if args.layout != "auto" else client.choose_layout(len(X_test))
    keys = client.keys(layout)
    bundle_bytes = client.public_bundle_bytes(layout)
    t_keys = time.perf_counter() - t
    t = time.perf_counter()
    _, request = client.encrypt(X_test, layout)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    bundle = server.load_bundle(bundle_bytes)
    t_reg = time.perf_counter() - t
    t = time.perf_counter()
    response = server.run(request, bundle)
    t_srv = time.perf_counter() - t
    t = time.perf_counter()
    raw = client.decrypt(response)
    pred = client.predict(raw)
    t_dec = time.perf_counter() - t

    plain = model.predict(X_test)
    agree = float(np.mean(pred == plain))
    print(f"CKKS N={keys.params.poly_modulus_degree}, modulus {list(keys.params.coeff_modulus_bits)} bits, "
          f"128-bit security, {layout} layout")
    rows = [
        ("key generation (client, once)", t_keys, len(bundle_bytes), "public bundle, sent once"),
        ("load public bundle (server, once)", t_reg, 0, ""),
        ("encrypt + serialize (client)", t_enc, len(request), "request: ciphertexts only"),
        ("evaluate on ciphertexts (server)", t_srv, len(response), "response: ciphertexts only"),
        ("decrypt + decode (client)", t_dec, 0, ""),
    ]
    for name, secs, nbytes, what in rows:
        size = f"{nbytes / 1024:9.1f} kB  {what}" if nbytes else ""
        print(f"  {name:34s} {secs * 1e3:8.1f} ms  {size}")
    total = t_enc + t_srv + t_dec
    print(f"end to end: {total * 1e3:.1f} ms for {len(X_test)} samples "
          f"({len(X_test) / total:,.0f} samples/s)")
    print(f"accuracy: encrypted {np.mean(pred == y_test):.4f}, plaintext {np.mean(plain == y_test):.4f}; "
          f"encrypted predictions equal plaintext on {agree:.2%} of samples")
    return 0 if agree >= 0.995 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description=__doc__)
    parser.add_argument("--version", action="version", version=f"veil {veil.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="encrypted inference end to end on a bundled dataset")
    demo.add_argument("--dataset", choices=DATASETS, default="iris")
    demo.add_argument("--layout", choices=("auto", "batch", "row"), default="auto")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
