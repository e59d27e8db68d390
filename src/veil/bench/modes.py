"""One function per technology: each trains or evaluates the same model on the same split and returns a row.

Every row has the keys of `ROW_KEYS` (see `row`). Times are wall-clock seconds on this machine; a
slowdown divides a mode's time by the plaintext time of the same kind (inference per sample in batch
against plaintext batch inference, single-sample latency against plaintext single-sample latency,
an MPC epoch against the same epoch in plaintext torch, a federated round against the same local
training done once centrally). Bytes are what crosses a network (or would, for the in-process HE
rows: the serialized request and response). Nothing here is estimated: a row that cannot be
measured says so and carries no numbers.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.bench.network import TrainSpec, build_network, plain_twin
from veil.bench.timing import best_of
from veil.errors import VeilError
from veil.fl.data import Dataset

# rows evaluated where each costs a round trip (row layout, MPC inference): enough for accuracy, bounded time
MAX_EVAL_ROWS = 1024

ROW_KEYS = ("mode", "measures", "accuracy", "agreement", "agreement_with", "inference_s_per_sample",
            "inference_slowdown", "training_s_per_unit", "training_unit", "training_slowdown", "bytes_on_wire",
            "key_bytes", "threat_model", "details")

# the rule-of-thumb slowdowns commonly quoted for each technology, printed beside the measured ones
SEED_GUESSES = {"plaintext": "1x (baseline)", "HE": "~10000x slower", "MPC": "10~100x slower",
                "TEE": "10%~10x slower"}


class BenchError(VeilError, ValueError):
    """Settings or data `veil bench` cannot measure (unknown dataset or model, unreadable file, regression data)."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; `quick` keeps the whole run under about three minutes on two cores.

    Parameters
    ----------
    mlp_hidden, mlp_iter : int
        Hidden width and Adam epochs of the `veil.ml.MLPClassifier` (square activation).
    row_samples : int
        Single samples timed one by one in the row layout.
    latency_runs : int
        Single samples timed one by one in plaintext.
    mpc_epochs, mpc_batch : int
        Epochs and batch size of the MPC training (and its plaintext twin).
    fl_clients, fl_rounds : int
        Data owners and training rounds of the federated runs.
    """

    mlp_hidden: int = 32
    mlp_iter: int = 150
    row_samples: int = 20
    latency_runs: int = 200
    mpc_epochs: int = 10
    mpc_batch: int = 32
    fl_clients: int = 10
    fl_rounds: int = 15

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        """Full-run sizes, or the reduced ones of `--quick`."""
        if quick:
            return cls(mlp_iter=60, row_samples=3, latency_runs=50, mpc_epochs=4, fl_rounds=5)
        return cls()


@dataclass
class Context:
    """What every mode shares: the split, the compiled plaintext model and its reference timings."""

    dataset: str
    model_kind: str
    data: Dataset
    settings: Settings
    model: Any = None
    plain_pred: np.ndarray | None = None
    plain: dict[str, float] = field(default_factory=dict)
    attest_policy: Any = None
    """A `veil.tee.Policy` (or policy file) trusting this machine's TEE: the TEE row is measured with it."""


def row(mode: str, measures: str, threat_model: str, **values: Any) -> dict[str, Any]:
    """A result row with every key of `ROW_KEYS` (absent values are None, `details` a dict)."""
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    out: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    out.update(mode=mode, measures=measures, threat_model=threat_model, details={})
    out.update(values)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fill(X: np.ndarray, n: int) -> np.ndarray:
    """`n` rows cycling through `X` (to fill a ciphertext's slots; the first len(X) rows are X itself)."""
    return X[np.arange(n) % len(X)]


def _veil_model(kind: str, settings: Settings) -> Any:
    from veil import ml

    if kind == "logreg":
        return ml.LogisticRegression(max_iter=5000)
    return ml.MLPClassifier(hidden_layer_sizes=(settings.mlp_hidden,), activation="square",
                            learning_rate_init=0.01, max_iter=settings.mlp_iter, random_state=0)


def plaintext(ctx: Context) -> dict[str, Any]:
    """Train the `veil.ml` model in plaintext (scikit-learn / torch, one thread), compile it for the HE
    rows, and time its inference: per sample in a batch as large as one HE ciphertext's slots, and
    single samples one by one. Fills `ctx` with the model and the reference timings."""
    d, s = ctx.data, ctx.settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _veil_model(ctx.model_kind, s)
        t0 = time.perf_counter()
        model.fit(d.X_train, d.y_train)
        fit_s = time.perf_counter() - t0
        iterations = int(np.max(model.n_iter_))
        model.compile(d.X_train)
        n_batch = model.fhe_client.params["batch"].slot_count
        X_batch = _fill(d.X_test, n_batch)
        pred = model.predict(d.X_test)
        batch_s = best_of(lambda: model.predict(X_batch)) / n_batch
        lat = []
        for i in range(s.latency_runs):
            x = d.X_test[i % len(d.X_test)][None]
            t0 = time.perf_counter()
            model.predict(x)
            lat.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    ctx.model, ctx.plain_pred = model, pred
    ctx.plain = {"batch_s_per_sample": batch_s, "single_s": statistics.median(lat), "fit_s": fit_s,
                 "epoch_s": fit_s / max(iterations, 1)}
    name = "LogisticRegression (lbfgs)" if ctx.model_kind == "logreg" else (
        f"MLPClassifier {d.X_train.shape[1]}-{s.mlp_hidden}-{len(d.classes)}, square activation, Adam")
    return row("plaintext", f"{name}; scikit-learn/torch on one thread; batch inference per sample",
               "the model owner sees every training row, every query and every prediction",
               accuracy=float(np.mean(ctx.plain_pred == d.y_test)), agreement=1.0, agreement_with="itself",
               inference_s_per_sample=batch_s, inference_slowdown=1.0, training_s_per_unit=ctx.plain["epoch_s"],
               training_unit="epoch (solver iteration)", training_slowdown=1.0, bytes_on_wire=0,
               details={"fit_seconds": fit_s, "iterations": iterations, "single_sample_s": ctx.plain["single_s"],
                        "batch_rows": n_batch})


def he_measure(model: Any, X: np.ndarray, layout: str) -> dict[str, Any]:
    """Encrypt `X` in `layout`, evaluate on ciphertexts, decrypt: in-process client and server of a
    compiled `veil.ml` model, after one untimed warm-up request. Returns predictions, seconds of each
    phase, request/response bytes and the public bundle (evaluation keys) size and key generation time."""
    from veil.he import PublicBundle

    client = model.fhe_client
    t0 = time.perf_counter()
    bundle_bytes = client.public_bundle(layout).to_bytes()
    keygen_s = time.perf_counter() - t0
    bundle = PublicBundle.from_bytes(bundle_bytes)
    client.decrypt(model.circuit_.run(client.encrypt(X[:1], layout), bundle), 1)
    t0 = time.perf_counter()
    request = client.encrypt(X, layout)
    t1 = time.perf_counter()
    response = model.circuit_.run(request, bundle)
    t2 = time.perf_counter()
    raw = client.decrypt(response, len(X))
    t3 = time.perf_counter()
    return {"pred": model.output_spec_.predict(raw), "seconds": t3 - t0, "encrypt_s": t1 - t0, "server_s": t2 - t1,
            "decrypt_s": t3 - t2, "request_bytes": len(request), "response_bytes": len(response),
            "bundle_bytes": len(bundle_bytes), "keygen_s": keygen_s, "client": client, "bundle": bundle}


HE_THREAT = ("server sees ciphertexts, CKKS parameters and evaluation keys only; the data owner holds the "
             "secret key and alone sees inputs and predictions; the model stays with the server")


def he_batch(ctx: Context) -> dict[str, Any]:
    """CKKS inference in the batch layout, in-process: one ciphertext per feature with the test rows
    (cycled to fill every slot) in the slots."""
    d, model = ctx.data, ctx.model
    n = model.fhe_client.params["batch"].slot_count
    m = he_measure(model, _fill(d.X_test, n), "batch")
    n_eval = min(n, len(d.X_test))
    pred = m["pred"][:n_eval]
    per_sample = m["seconds"] / n
    wire = m["request_bytes"] + m["response_bytes"]
    return row("HE batch", f"CKKS (SEAL) inference, batch layout, in-process; {n} rows (test set cycled) in one "
                           "request; per sample = encrypt + evaluate + decrypt / rows",
               HE_THREAT, accuracy=float(np.mean(pred == d.y_test[:n_eval])),
               agreement=float(np.mean(pred == ctx.plain_pred[:n_eval])), agreement_with="plaintext model",
               inference_s_per_sample=per_sample,
               inference_slowdown=_ratio(per_sample, ctx.plain["batch_s_per_sample"]),
               bytes_on_wire=wire, key_bytes=m["bundle_bytes"],
               details={k: m[k] for k in ("encrypt_s", "server_s", "decrypt_s", "request_bytes", "response_bytes",
                                          "keygen_s")} | {"rows": n, "bytes_per_sample": wire / n})


def he_row(ctx: Context) -> dict[str, Any]:
    """CKKS inference in the row (single-sample) layout, in-process: the test set (its first
    `MAX_EVAL_ROWS`) for accuracy and agreement, then single samples one by one for latency."""
    d, model, s = ctx.data, ctx.model, ctx.settings
    n = min(len(d.X_test), MAX_EVAL_ROWS)
    m = he_measure(model, d.X_test[:n], "row")
    client, bundle = m["client"], m["bundle"]
    times, up, down = [], 0, 0
    for i in range(s.row_samples):
        t0 = time.perf_counter()
        request = client.encrypt(d.X_test[i:i + 1], "row")
        response = model.circuit_.run(request, bundle)
        client.decrypt(response, 1)
        times.append(time.perf_counter() - t0)
        up, down = len(request), len(response)
    latency = statistics.median(times)
    return row("HE row", f"CKKS (SEAL) inference, row layout, in-process; latency = median of {s.row_samples} "
                         "single samples (encrypt + evaluate + decrypt)",
               HE_THREAT, accuracy=float(np.mean(m["pred"] == d.y_test[:n])),
               agreement=float(np.mean(m["pred"] == ctx.plain_pred[:n])), agreement_with="plaintext model",
               inference_s_per_sample=latency, inference_slowdown=_ratio(latency, ctx.plain["single_s"]),
               bytes_on_wire=up + down, key_bytes=m["bundle_bytes"],
               details={"single_request_bytes": up, "single_response_bytes": down, "keygen_s": m["keygen_s"],
                        "test_set_seconds": m["seconds"], "test_set_bytes": m["request_bytes"] + m["response_bytes"],
                        "plaintext_single_sample_s": ctx.plain["single_s"], "evaluated_rows": n})


def he_serve(ctx: Context) -> dict[str, Any]:
    """CKKS inference through `veil serve` on 127.0.0.1 (a free port, HTTP on loopback, stopped
    afterwards): deploy, register the public bundle, one batch-layout request, decrypt."""
    from veil.serve import Client
    from veil.serve.server import serve_deployed

    d, model = ctx.data, ctx.model
    with tempfile.TemporaryDirectory(prefix="veil-bench-serve-") as tmp:
        model.save(Path(tmp) / "model")
        with (serve_deployed(tmp, Path(tmp) / "model", "bench", "bench") as (url, user),
              Client(url, user) as client):
            version, mc = client.model("bench")
            n = mc.circuit.params["batch"].slot_count
            X = _fill(d.X_test, n)
            bundle = mc.public_bundle_bytes("batch")
            key_id = client.register(bundle)
            _, warm = mc.encrypt(X[:1], "batch")
            client.send("bench", version, key_id, warm)
            t0 = time.perf_counter()
            _, request = mc.encrypt(X, "batch")
            response = client.send("bench", version, key_id, request)
            pred = mc.predict(mc.decrypt(response, n))[:len(d.X_test)]  # at most n rows
            seconds = time.perf_counter() - t0
    per_sample = seconds / n
    wire = len(bundle) + len(request) + len(response)
    return row("HE serve", f"the batch-layout request of `HE batch` through `veil serve` over HTTP on 127.0.0.1 "
                           f"({n} rows); bytes = public bundle (once) + request + response bodies",
               HE_THREAT + "; the server also sees the client's token and request timing",
               accuracy=float(np.mean(pred == d.y_test[:len(pred)])),
               agreement=float(np.mean(pred == ctx.plain_pred[:len(pred)])),
               agreement_with="plaintext model", inference_s_per_sample=per_sample,
               inference_slowdown=_ratio(per_sample, ctx.plain["batch_s_per_sample"]), bytes_on_wire=wire,
               key_bytes=len(bundle), details={"rows": n, "request_bytes": len(request),
                                               "response_bytes": len(response), "seconds": seconds})


MPC_LR = {"logreg": 0.1, "mlp": 0.3}
MPC_THREAT = ("2 semi-honest parties each hold additive shares over TLS 1.3; each sees only masked openings; "
              "the dealer sees randomness requests (shapes), never inputs; weights and predictions are revealed "
              "to party 0 (model and test owner) only; safe while the dealer colludes with no party")


def mpc(ctx: Context) -> dict[str, Any]:
    """MPC training and inference: 2 computing parties + a dealer as 3 processes over mutually
    authenticated TLS 1.3 on 127.0.0.1 (`veil.mpc.launch`), the same network trained in plaintext torch
    from the same weights and batches as the reference (`network.plain_twin`).

    Inputs are standardized with the training set's mean and scale and clipped to +-3 (a rare non-zero
    pixel would otherwise be a 30-sigma outlier that throws SGD off), taken as public preprocessing:
    the parties do not compute the statistics under MPC. The learning rate is `MPC_LR[model]` times
    K / (d + 1) (K classes, d features), below the stability limit of SGD with momentum 0.9 on the mean
    squared error, whose curvature grows with d / K, so every bundled dataset trains without tuning."""
    from veil.mpc import launch

    d, s = ctx.data, ctx.settings
    classes = d.classes
    mean, scale = d.X_train.mean(0), d.X_train.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    X = torch.tensor(np.clip((d.X_train - mean) / scale, -3, 3), dtype=torch.float32)
    n_test = min(len(d.X_test), MAX_EVAL_ROWS)
    y_test = d.y_test[:n_test]
    X_test = torch.tensor(np.clip((d.X_test[:n_test] - mean) / scale, -3, 3), dtype=torch.float32)
    y = torch.tensor(np.searchsorted(classes, d.y_train), dtype=torch.int64)
    spec = TrainSpec(model=ctx.model_kind, n_features=X.shape[1], n_classes=len(classes), hidden=s.mlp_hidden,
                     epochs=s.mpc_epochs, batch=s.mpc_batch,
                     lr=MPC_LR[ctx.model_kind] * len(classes) / (X.shape[1] + 1), momentum=0.9, seed=0)
    twin = plain_twin(spec, X, y, X_test)
    half = len(X) // 2
    counts = [half, len(X) - half]
    t0 = time.perf_counter()
    p0, p1, dealer = launch("veil.bench.mpc_party:party_program", 2, args=(spec.to_dict(), counts, len(X_test)),
                            party_args=[(X[:half], y[:half], X_test), (X[half:], y[half:])],
                            timeout=120.0, wall_timeout=900.0)
    wall = time.perf_counter() - t0
    pred = classes[p0["logits"].argmax(1).numpy()]
    twin_pred = classes[twin["logits"].argmax(1).numpy()]
    revealed = build_network(spec)
    revealed.load_state_dict(p0["weights"])
    with torch.no_grad():
        revealed_pred = classes[revealed(X_test).argmax(1).numpy()]
    epoch = statistics.mean(p0["epoch_seconds"])
    infer = p0["infer_seconds"] / len(X_test)
    wire = sum(p["total_traffic"]["wire_bytes_sent"] for p in (p0, p1)) + dealer["wire_bytes_sent"]
    train_wire = sum(p["train_traffic"]["wire_bytes_sent"] for p in (p0, p1))
    infer_wire = sum(p["infer_traffic"]["wire_bytes_sent"] for p in (p0, p1))
    arch = "linear" if spec.model == "logreg" else f"{spec.n_features}-{spec.hidden}-{spec.n_classes} square"
    return row("MPC", f"2 parties + dealer, 3 processes over TLS 1.3; {arch} network, MSE on one-hot, SGD, "
                      f"{spec.epochs} epochs of batch {spec.batch}, then inference on the shared test set; "
                      "against the same training in plaintext torch",
               MPC_THREAT, accuracy=float(np.mean(pred == y_test)), agreement=float(np.mean(pred == twin_pred)),
               agreement_with="same network trained in plaintext", inference_s_per_sample=infer,
               inference_slowdown=_ratio(infer, twin["infer_seconds"] / len(X_test)), training_s_per_unit=epoch,
               training_unit="epoch", training_slowdown=_ratio(epoch, statistics.mean(twin["epoch_seconds"])),
               bytes_on_wire=wire, key_bytes=None,
               details={"spec": spec.to_dict(), "plaintext_twin_accuracy": float(np.mean(twin_pred == y_test)),
                        "agreement_with_revealed_weights_in_plaintext": float(np.mean(pred == revealed_pred)),
                        "train_wire_bytes_per_epoch_parties": train_wire / spec.epochs,
                        "inference_wire_bytes_parties": infer_wire,
                        "rounds_per_epoch_party0": p0["train_traffic"]["rounds"] / spec.epochs,
                        "dealer_wire_bytes": dealer["wire_bytes_sent"], "wall_seconds_with_process_start": wall,
                        "plaintext_epoch_s": statistics.mean(twin["epoch_seconds"]),
                        "keys": "TLS certificates only (no evaluation keys)"})


def federated(ctx: Context, secagg: bool) -> dict[str, Any]:
    """Flower federated training with `fl_clients` owners (IID split of the same training rows, federated
    standardization), on veil's in-process Flower grid (the same ServerApp/ClientApp and mods, messages
    serialized and counted), with or without SecAgg+; then the federated model, exported to `veil.ml`,
    predicts the test set on ciphertexts (batch layout, in-process)."""
    from sklearn.preprocessing import StandardScaler

    from veil.fl.config import FLConfig, Task
    from veil.fl.export import to_veil_model
    from veil.fl.simulation import run_simulation

    d, s = ctx.data, ctx.settings
    fl_model = "logreg" if ctx.model_kind == "logreg" else "torch-mlp"
    cfg = FLConfig(dataset=ctx.dataset, model=fl_model, clients=s.fl_clients, rounds=s.fl_rounds, secagg=secagg)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's per-round lines would bury the progress bar
    try:
        result = run_simulation(cfg, engine="inprocess")
    finally:
        flwr_log.setLevel(level)
    stats_s = float((result.statistics or {}).get("wall_time", 0.0))
    per_round = (result.wall_time - stats_s) / cfg.rounds
    central = cfg.learner(Task(d.X_train.shape[1], d.classes))
    Xs = StandardScaler().fit_transform(d.X_train)
    central_s = best_of(lambda: central.fit(Xs, d.y_train, {}))
    model = to_veil_model(result, d.X_train)
    fed_plain = result.predict(d.X_test)
    n = model.fhe_client.params["batch"].slot_count
    m = he_measure(model, _fill(d.X_test, n), "batch")
    n_eval = min(n, len(d.X_test))
    pred = m["pred"][:n_eval]
    X_batch = _fill(d.X_test, n)
    plain_s = best_of(lambda: result.predict(X_batch)) / n
    traffic = result.traffic or {}
    wire = traffic.get("bytes_to_nodes", 0) + traffic.get("bytes_from_nodes", 0)
    he_wire = m["request_bytes"] + m["response_bytes"]
    what = "logistic regression (1 L-BFGS iteration per round)" if fl_model == "logreg" else (
        f"torch MLP {d.X_train.shape[1]}-64-{len(d.classes)}, ReLU-fitted quadratic, "
        f"{cfg.epochs} local epochs per round")
    threat = ("the server sees only the SecAgg+ sum of the owners' updates (and aggregate feature statistics, "
              "the total row count); each owner keeps its rows" if secagg else
              "the server sees every owner's model update, feature statistics and row count; each owner keeps its rows")
    return row("FL + SecAgg+" if secagg else "FL", f"Flower, {cfg.clients} owners, {cfg.rounds} rounds, {what}; "
               "round = training time per round against the same local training done once on all rows; "
               "inference = the federated model on ciphertexts (batch layout)",
               threat + "; at inference, the guarantees of the HE rows",
               accuracy=float(np.mean(pred == d.y_test[:n_eval])),
               agreement=float(np.mean(pred == fed_plain[:n_eval])), agreement_with="federated model in plaintext",
               inference_s_per_sample=m["seconds"] / n, inference_slowdown=_ratio(m["seconds"] / n, plain_s),
               training_s_per_unit=per_round, training_unit="round", training_slowdown=_ratio(per_round, central_s),
               bytes_on_wire=wire + he_wire, key_bytes=m["bundle_bytes"],
               details={"plaintext_federated_accuracy": float(np.mean(fed_plain == d.y_test)),
                        "training_bytes": wire, "training_messages": traffic.get("messages", 0),
                        "inference_bytes": he_wire, "statistics_rounds": (result.statistics or {}).get("rounds", 0),
                        "statistics_seconds": stats_s, "wall_seconds": result.wall_time,
                        "central_round_equivalent_s": central_s, "engine": "veil in-process Flower grid"})


TEE_THREAT = ("the enclave sees plaintext; the host OS and operator see encrypted memory only; trust rests on the "
              "CPU vendor and remote attestation (side channels are out of scope)")


def tee(ctx: Context) -> dict[str, Any]:
    """Trusted execution, measured only inside an attesting enclave or confidential VM and with a policy
    that trusts it (`ctx.attest_policy`); otherwise a row saying why not, without numbers.

    Measured: the test set's plaintext predictions through `veil serve --attest PLATFORM` on 127.0.0.1
    over TLS (a certificate made for the run), from a `veil.Client(attest=policy)` that verifies the
    server's evidence, bound to that TLS key, before sending anything; attestation (evidence from the
    device, verification) is timed apart. Run inside the enclave, the plaintext row is the enclave's
    own, so the slowdown shows the cost of attested serving, not of enclave memory encryption."""
    from veil.tee.providers import NO_DEVICE, detect

    found = detect()
    if found is None or ctx.attest_policy is None:
        reason = NO_DEVICE if found is None else (
            f"{found[0]} device {found[1]} found, but no --attest-policy trusting it was given")
        return row("TEE", f"not measured: {reason}", TEE_THREAT, agreement_with=None,
                   details={"measured": False, "reason": reason, "seed_guess": SEED_GUESSES["TEE"]})
    return _tee_measured(ctx, found[0])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made for one run (the client trusts exactly it)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil bench enclave")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "tls.pem", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _tee_measured(ctx: Context, platform: str) -> dict[str, Any]:
    from veil.serve import Client
    from veil.serve.server import serve_deployed

    d, model = ctx.data, ctx.model
    with tempfile.TemporaryDirectory(prefix="veil-bench-tee-") as tmp:
        root = Path(tmp)
        model.save(root / "model")
        cert, key = _self_signed(root)
        with (serve_deployed(root, root / "model", "bench", "bench", verify=str(cert), tls_cert=str(cert),
                             tls_key=str(key), attest=platform) as (url, user),
              Client(url, user, verify=str(cert), attest=ctx.attest_policy) as client):
            t0 = time.perf_counter()
            attested = client.attest()
            attest_s = time.perf_counter() - t0
            client.predict(d.X_test[:1], "bench")
            t0 = time.perf_counter()
            pred = client.predict(d.X_test, "bench")
            seconds = time.perf_counter() - t0
    per_sample = seconds / len(d.X_test)
    wire_rows = len(d.X_test) * d.X_test.shape[1]
    return row(f"TEE ({platform})", f"plaintext predictions of the test set through `veil serve --attest {platform}` "
                                    "over TLS on 127.0.0.1, after the client verified the server's evidence bound to "
                                    "its TLS key (attestation timed apart); inside the enclave, so the slowdown is "
                                    "attested serving's, not memory encryption's",
               TEE_THREAT, accuracy=float(np.mean(pred == d.y_test)), agreement=float(np.mean(pred == ctx.plain_pred)),
               agreement_with="plaintext model", inference_s_per_sample=per_sample,
               inference_slowdown=_ratio(per_sample, ctx.plain["batch_s_per_sample"]),
               details={"measured": True, "platform": platform, "attestation_s": attest_s, "seconds": seconds,
                        "measurement": attested.claims.measurement.hex(), "features_sent": wire_rows,
                        "seed_guess": SEED_GUESSES["TEE"]})
