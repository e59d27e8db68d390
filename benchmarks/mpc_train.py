"""The experiment of PySyft's encrypted-training tutorial (OpenMined, 2019: MNIST, SMPC and autograd)
with veil.mpc, side by side with plaintext torch.

MLP 784-128-64-10 (ReLU), the tutorial's squared error on one-hot targets (summed over classes,
averaged over the batch: ((out - target) ** 2).sum() / batch_size), 640 training items (scikit-learn digits
upsampled to 28x28; MNIST cannot be downloaded here), batch 64, SGD lr 0.02, 20 epochs; two
computing parties plus the dealer as three processes linked by mutually authenticated TLS 1.3 on
127.0.0.1 (`veil.mpc.transport`), one torch thread each. Party 0 (model owner) and party 1 each own half of the rows.
Inputs are normalised with MNIST's mean and std, as in the tutorial.
Plaintext training starts from the same weights and sees the batches in the same order.

Second experiment: a small ResNet-style CNN (conv, BatchNorm in training mode, residual block,
avg-pool, max-pool, linear) on 8x8 digits, torch's mean MSE, SGD lr 0.1 with momentum 0.9,
20 epochs, under MPC and in plaintext.

The cost of TLS is measured in the same run: the CPU time to encrypt and decrypt one batch's
traffic (its bytes, in its number of messages) through a TLS 1.3 session (AES-256-GCM, memory
BIOs, as the transport does), and the framing overhead (bytes written to sockets / payload).

CrypTen, side by side: if a Python with CrypTen is available (``--crypten-python``, the
CRYPTEN_PYTHON variable, or /work/crypten-venv made by benchmarks/peers/setup_crypten.sh), the
same experiment (same data, initial weights, batches, epochs) runs under CrypTen's TTP mode
right after veil's, and both figures are reported; otherwise CrypTen is marked "not measured in
this run" and no ratio is computed.

Writes benchmarks/results/mpc_train.json and .png.
    .venv/bin/python benchmarks/mpc_train.py            # full run (~6 minutes, more with CrypTen)
    .venv/bin/python benchmarks/mpc_train.py --quick    # 2 epochs, smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from veil.mpc import certs, launch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the experiment models live in benchmarks/ (run as a script or a module)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
from benchmarks.mpc_models import load_digits, make_model, plain_train  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
PYSYFT_SECONDS_PER_BATCH = 3.2  # as published for PySyft's encrypted-training tutorial (2019), not measured
TARGET_SECONDS_PER_BATCH = 0.07
CHUNK = 1 << 18  # the transport's encryption slice


def tls_cost(nbytes: float, messages: float, repeats: int = 5) -> dict:
    """CPU seconds to encrypt and decrypt ``nbytes`` in ``messages`` messages with TLS 1.3, measured now.

    Uses a client/server session pair over memory BIOs with the transport's own contexts (TLS 1.3,
    mutual certificates) and its slicing; the median of ``repeats`` runs.
    """
    with tempfile.TemporaryDirectory() as tmp:
        pki = certs.make_dev_pki(tmp, 2)
        server_ctx, _ = pki[0].contexts()
        _, client_ctx = pki[1].contexts()
        server_ctx.num_tickets = 0
        bios = [ssl.MemoryBIO() for _ in range(4)]
        srv = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
        cli = client_ctx.wrap_bio(bios[2], bios[3], server_side=False)
        for _ in range(10):
            for obj in (cli, srv):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            bios[0].write(bios[3].read())
            bios[2].write(bios[1].read())
        cipher = cli.cipher()
    size = max(1, int(nbytes / max(messages, 1)))
    msg = memoryview(bytearray(size))
    sink = memoryview(bytearray(CHUNK))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(max(1, round(messages))):
            for i in range(0, size, CHUNK):
                cli.write(msg[i : i + CHUNK])  # encrypt one slice, as the sender does
                bios[0].write(bios[3].read())
                got = 0
                while got < len(msg[i : i + CHUNK]):  # decrypt it, as the receiver's reader does
                    got += srv.read(CHUNK, sink)
        times.append(time.perf_counter() - t0)
    return {"seconds_per_batch": statistics.median(times), "cipher": cipher[0], "protocol": cipher[1],
            "bytes": nbytes, "messages": messages}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the tutorial's transforms.Normalize


def accuracy(model_name: str, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Plaintext test accuracy (percent) of the given weights."""
    m = make_model(model_name)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return 100.0 * float((m(x).argmax(1) == y).float().mean())


def crypten_python(arg: str | None) -> str | None:
    """The Python with CrypTen to use: the argument, $CRYPTEN_PYTHON, or the setup script's venv."""
    for cand in (arg, os.environ.get("CRYPTEN_PYTHON"), os.environ.get("CRYPTEN_VENV", "/work/crypten-venv") +
                 "/bin/python"):
        if cand and Path(cand).exists():
            return cand
    return None


def run_crypten(python: str | None, cfg: dict, init: dict, x_tr, y_tr, x_te, y_te) -> dict:
    """The tutorial's experiment under CrypTen (2 parties + TTP as processes), on the same data and weights."""
    script = HERE / "peers" / "crypten_mnist_training.py"
    if python is None or not script.exists():
        return {"measured": False, "reason": "no Python with CrypTen (run benchmarks/peers/setup_crypten.sh)"}
    with tempfile.TemporaryDirectory() as tmp:
        data, weights, out = Path(tmp) / "data.npz", Path(tmp) / "init.pt", Path(tmp) / "crypten.json"
        np.savez(data, x=x_tr.reshape(len(x_tr), -1).numpy(), y=y_tr.numpy(),
                 x_test=x_te.reshape(len(x_te), -1).numpy(), y_test=y_te.numpy())
        torch.save(init, weights)
        cmd = [python, str(script), "--epochs", str(cfg["epochs"]), "--n-train", str(len(x_tr)), "--batch",
               str(cfg["batch"]), "--lr", str(cfg["lr"]), "--data", str(data), "--init", str(weights),
               "--seed", str(cfg["seed"]), "--out", str(out)]
        load_before = os.getloadavg()[0]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if res.returncode != 0 or not out.exists():
            return {"measured": False, "reason": f"CrypTen run failed: {res.stderr.strip().splitlines()[-8:]}"}
        return {"measured": True, "load_average_1min_before": load_before, **json.loads(out.read_text())}


def run_experiment(name: str, cfg: dict, x_tr, y_tr, x_te, y_te, crypten: str | None = None) -> dict:
    """Plaintext and MPC training of one model from the same initial weights; returns the summary."""
    torch.manual_seed(cfg["seed"])
    init = make_model(cfg["model"]).state_dict()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    plain = plain_train(cfg, init, x_tr, y_tr)
    plain_total = time.perf_counter() - t0
    half = len(x_tr) // 2
    owned = {0: (x_tr[:half], y_tr[:half]), 1: (x_tr[half:], y_tr[half:])}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    public = (cfg, [len(owned[0][0]), len(owned[1][0])], tuple(x_tr.shape[1:]))
    res = launch("benchmarks.mpc_models:party_train", 2, public, party_args=[(owned[0], init, x_te), (owned[1],)],
                 timeout=120, wall_timeout=3600)
    wall = time.perf_counter() - t0
    p0, p1, dealer = res
    n_batches = len(p0["batch_times"])
    per_batch_bytes = [a["bytes_sent"] + b["bytes_sent"] for a, b in zip(p0["traffic"], p1["traffic"], strict=True)]
    dealer_bytes = [b["bytes_from_dealer"] for b in p1["traffic"]]
    to_dealer = [b["bytes_to_dealer"] for b in p1["traffic"]]
    between = [a["bytes_sent"] + b["bytes_sent"] - t for a, b, t in zip(p0["traffic"], p1["traffic"], to_dealer,
                                                                         strict=True)]
    wire = [a["wire_bytes_sent"] + b["wire_bytes_sent"] for a, b in zip(p0["traffic"], p1["traffic"], strict=True)]
    messages = [a["messages"] + b["messages"] for a, b in zip(p0["traffic"], p1["traffic"], strict=True)]
    mpc_t = p0["batch_times"]
    steady = mpc_t[1:] if len(mpc_t) > 1 else mpc_t
    plain_t = plain["batch_times"][1:] if len(plain["batch_times"]) > 1 else plain["batch_times"]
    out = {
        "config": cfg,
        "load_average_1min_before_after_mpc_run": [load_before[0], os.getloadavg()[0]],
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "batches": n_batches,
        "mpc": {
            "seconds_per_batch_mean": statistics.mean(steady),
            "seconds_per_batch_median": statistics.median(steady),
            "seconds_first_batch": mpc_t[0],
            "bytes_per_batch_total": statistics.mean(per_batch_bytes) + statistics.mean(dealer_bytes),
            "bytes_per_batch_between_parties": statistics.mean(between),
            "bytes_per_batch_from_dealer": statistics.mean(dealer_bytes),
            "bytes_per_batch_to_dealer": statistics.mean(to_dealer),
            "rounds_per_batch": statistics.mean(a["rounds"] for a in p0["traffic"]),
            "parties_wire_bytes_per_batch": statistics.mean(wire),
            "parties_payload_bytes_per_batch": statistics.mean(per_batch_bytes),
            "messages_per_batch_parties": statistics.mean(messages),
            "dealer_requests_total": dealer["requests"],
            "dealer_requests_precomputed": dealer["precomputed_hits"],
            "wall_seconds_including_process_start_and_sharing": wall,
            "test_accuracy_revealed_weights": accuracy(cfg["model"], p0["weights"], x_te, y_te),
            "test_accuracy_encrypted_inference": 100.0 * float((p0["test_logits"].argmax(1) == y_te).float().mean()),
            "encrypted_inference_seconds": p0["infer_time"],
            "encrypted_inference_bytes": p0["infer_traffic"]["bytes_sent"] + p1["infer_traffic"]["bytes_sent"],
        },
        "plaintext": {
            "seconds_per_batch_mean": statistics.mean(plain_t),
            "seconds_total": plain_total,
            "test_accuracy": accuracy(cfg["model"], plain["state"], x_te, y_te),
        },
        "timing_note": (
            "per-batch time measured in party 0 around zero_grad/forward/loss/backward/step; it includes the "
            "dealer's on-line generation of triples (requested at the start of each protocol step and "
            "overlapped with the parties' exchange; after the first batch the dealer precomputes the answer it "
            "expects next while the parties compute); there is no separate offline phase. Bytes count both "
            "parties' sent bytes plus the dealer's corrections; rounds are party 0's communication rounds."
        ),
        "mpc_batch_times": mpc_t,
        "plain_batch_times": plain["batch_times"],
    }
    tls = tls_cost(out["mpc"]["bytes_per_batch_total"], statistics.mean(messages) + 1)
    tls["fraction_of_mpc_batch_time"] = tls["seconds_per_batch"] / out["mpc"]["seconds_per_batch_median"]
    m = out["mpc"]
    tls["wire_overhead_ratio"] = m["parties_wire_bytes_per_batch"] / m["parties_payload_bytes_per_batch"]
    out["tls_cost"] = tls
    if cfg["model"] == "mlp":
        out["crypten"] = run_crypten(crypten, cfg, init, x_tr, y_tr, x_te, y_te)
        if out["crypten"]["measured"]:
            out["crypten_over_veil_seconds_per_batch"] = (
                out["crypten"]["seconds_per_batch_median"] / out["mpc"]["seconds_per_batch_median"])
    out["accuracy_gap_points"] = out["plaintext"]["test_accuracy"] - out["mpc"]["test_accuracy_revealed_weights"]
    out["slowdown_vs_plaintext"] = out["mpc"]["seconds_per_batch_mean"] / out["plaintext"]["seconds_per_batch_mean"]
    m, pl = out["mpc"], out["plaintext"]
    print(f"[{name}] mpc {m['seconds_per_batch_median']:.4f} s/batch (median), {m['bytes_per_batch_total'] / 1e6:.2f} "
          f"MB/batch, TLS {out['tls_cost']['seconds_per_batch'] * 1e3:.1f} ms/batch, "
          f"{m['rounds_per_batch']:.0f} rounds; acc mpc {m['test_accuracy_revealed_weights']:.1f} vs plain "
          f"{pl['test_accuracy']:.1f}; slowdown {out['slowdown_vs_plaintext']:.0f}x", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    """Per-batch times (MPC vs plaintext) and accuracies."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in results["experiments"].items():
        axes[0].plot(r["mpc_batch_times"], label=f"{name} MPC")
        axes[0].plot(r["plain_batch_times"], label=f"{name} plaintext", linestyle="--")
    axes[0].axhline(TARGET_SECONDS_PER_BATCH, color="gray", linestyle=":", label="target 0.07 s (MLP)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("batch")
    axes[0].set_ylabel("seconds")
    axes[0].set_title("time per training batch")
    axes[0].legend(fontsize=7)
    exp = results["experiments"]["mlp"]
    names, values = ["veil.mpc (TLS)"], [exp["mpc"]["seconds_per_batch_median"]]
    if exp.get("crypten", {}).get("measured"):
        names.append("CrypTen TTP\n(same run)")
        values.append(exp["crypten"]["seconds_per_batch_median"])
    names.append("PySyft 2019\n(published)")
    values.append(PYSYFT_SECONDS_PER_BATCH)
    axes[1].bar(names, values)
    axes[1].axhline(TARGET_SECONDS_PER_BATCH, color="gray", linestyle=":", label="target 0.07 s")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    axes[1].set_title("MLP: median seconds per batch")
    labels, plain_acc, mpc_acc = [], [], []
    for name, r in results["experiments"].items():
        labels.append(name)
        plain_acc.append(r["plaintext"]["test_accuracy"])
        mpc_acc.append(r["mpc"]["test_accuracy_revealed_weights"])
    xs = range(len(labels))
    axes[2].bar([i - 0.2 for i in xs], plain_acc, width=0.4, label="plaintext")
    axes[2].bar([i + 0.2 for i in xs], mpc_acc, width=0.4, label="MPC")
    axes[2].set_xticks(list(xs), labels)
    axes[2].set_ylim(0, 100)
    axes[2].set_title("test accuracy (%)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Run both experiments and write JSON + PNG."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2 epochs per experiment")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--crypten-python", default=None, help="a Python with CrypTen (see benchmarks/peers)")
    ns = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
               "pysyft_seconds_per_batch_published": PYSYFT_SECONDS_PER_BATCH,
               "experiments": {}}

    x28, y = load_digits(28)
    x28 = (x28 - MNIST_MEAN) / MNIST_STD
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:640], perm[640:1280]
    mlp_cfg = {"model": "mlp", "lr": 0.02, "epochs": 2 if ns.quick else 20, "batch": 64, "seed": 1,
               "loss": "seed", "encrypted_test": True, "n_test": len(te)}
    results["experiments"]["mlp"] = run_experiment("mlp", mlp_cfg, x28[tr], y[tr], x28[te], y[te],
                                                   crypten=crypten_python(ns.crypten_python))

    if not ns.skip_resnet:
        x8, _ = load_digits(8)
        x8 = (x8 - MNIST_MEAN) / MNIST_STD
        res_cfg = {"model": "resnet_bn", "lr": 0.1, "momentum": 0.9, "epochs": 2 if ns.quick else 20, "batch": 64,
                   "seed": 2, "loss": "mse", "encrypted_test": True, "n_test": len(te)}
        results["experiments"]["resnet"] = run_experiment("resnet", res_cfg, x8[tr], y[tr], x8[te], y[te])

    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if ns.quick else ""
    (OUT / f"mpc_train{suffix}.json").write_text(json.dumps(results, indent=2))
    plot(results, OUT / f"mpc_train{suffix}.png")
    print(f"wrote {OUT / f'mpc_train{suffix}.json'}")


if __name__ == "__main__":
    main()
