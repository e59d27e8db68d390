"""CrypTen 0.4.1 on the PySyft encrypted-training tutorial's experiment, as a measured peer for veil.mpc.

Standalone: run it with the CrypTen virtualenv's python (see setup_crypten.sh), never with veil's;
it does not import veil, so the two systems only share the data file the caller prepares.

Experiment (same as benchmarks/mpc_train.py): MLP 784-128-64-10 with ReLU, loss
((out - onehot) ** 2).sum() / batch, plain SGD (no momentum, no gradient threshold), two computing
parties plus CrypTen's trusted third party (TTP) as the dealer, three processes talking over
torch.distributed (gloo), one torch thread each. Party 0 (the model owner) encrypts the weights and
the first half of the training rows, party 1 the second half; the trained weights are revealed to
party 0 only and scored in plaintext on the test rows.

Input, written by the caller:
    --data FILE.npz   x (N, 1, 28, 28) or (N, 784) float32, y (N,) int64, x_test, y_test;
                      optionally orders (epochs, N) int64, the batch order per epoch (otherwise
                      generated like benchmarks/mpc_models.py epoch_orders from --seed).
    --init FILE.pt    state dict of the torch MLP (fc1/fc2/fc3 weight and bias) to start from.
Output: --out FILE.json with seconds per batch (excluding the first), CrypTen's own communication
counts per batch, test accuracy, versions.

Compatibility shims (applied at run time, nothing in site-packages is edited; see README.md):
torch 2.13 moved torch.onnx._internal.registration, which CrypTen's ONNX converter imports when
``crypten`` is imported, and made dynamo the default of torch.onnx.export, which CrypTen's
from_pytorch relies on not being. torchvision is not needed: only crypten.models imports it, and
this script never imports crypten.models.

    /work/crypten-venv/bin/python benchmarks/peers/crypten_mnist_training.py --data d.npz --init w.pt \\
        --epochs 2 --out crypten.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch
from torch import nn

WORLD_SIZE = 2  # computing parties; the TTP dealer is rank WORLD_SIZE


def apply_torch_compat_shims() -> list[str]:
    """Make CrypTen 0.4.1 importable and usable with torch 2.13 without editing its files.

    Returns a description of each shim applied, which goes into the JSON so the result says how
    CrypTen was run.
    """
    applied: list[str] = []
    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:
        # crypten/nn/onnx_converter.py does `from torch.onnx._internal.registration import registry`
        # at import time; torch 2.x moved that module under torchscript_exporter.
        moved = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
        sys.modules["torch.onnx._internal.registration"] = moved
        applied.append("sys.modules alias torch.onnx._internal.registration -> "
                       "torch.onnx._internal.torchscript_exporter.registration")
    export = torch.onnx.export
    if not getattr(export, "_crypten_shim", False):
        # CrypTen's from_pytorch passes TorchScript-exporter arguments (operator_export_type) and
        # patches the TorchScript symbolic registry, so it needs the legacy exporter.
        @functools.wraps(export)
        def export_legacy(*args: Any, **kwargs: Any) -> Any:
            """torch.onnx.export with dynamo=False unless the caller says otherwise."""
            kwargs.setdefault("dynamo", False)
            return export(*args, **kwargs)

        export_legacy._crypten_shim = True  # type: ignore[attr-defined]
        torch.onnx.export = export_legacy
        applied.append("torch.onnx.export defaults to dynamo=False")
    return applied


SHIMS = apply_torch_compat_shims()

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.nn as cnn  # noqa: E402
from crypten.mpc.provider import ttp_provider  # noqa: E402


class MLP(nn.Module):
    """The tutorial's network, 784-128-64-10 with ReLU (same parameter names as benchmarks/mpc_models.py MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = x.reshape(-1, 28 * 28)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build_crypten_model(state: dict[str, torch.Tensor], via: str) -> tuple[cnn.Module, list[str]]:
    """Unencrypted CrypTen model holding `state`, and the torch state-dict key of each parameter.

    "direct" builds crypten.nn.Linear/ReLU layers by hand; "onnx" goes through CrypTen's own
    from_pytorch (ONNX export of the torch model), the path CrypTen documents for torch users.
    Both give the same arithmetic (matmul by the transposed weight plus bias, ReLU).
    """
    if via == "direct":
        model = cnn.Sequential(cnn.Linear(784, 128), cnn.ReLU(), cnn.Linear(128, 64), cnn.ReLU(),
                               cnn.Linear(64, 10))
        layers = [model._modules[k] for k in model._modules if isinstance(model._modules[k], cnn.Linear)]
        keys = []
        for layer, name in zip(layers, ("fc1", "fc2", "fc3"), strict=True):
            layer.weight.data.copy_(state[f"{name}.weight"])
            layer.bias.data.copy_(state[f"{name}.bias"])
            keys += [f"{name}.weight", f"{name}.bias"]
        # map crypten's parameter names (e.g. "0.weight") to torch's, in registration order
        names = [n for n, _ in model.named_parameters()]
        return model, [dict(zip(names, keys, strict=True))[n] for n in names]
    torch_model = MLP()
    torch_model.load_state_dict(state)
    model = crypten.nn.from_pytorch(torch_model, torch.zeros(1, 784))
    keys = []
    for name, p in model.named_parameters():
        match = [k for k, v in state.items() if k in name.replace("_", ".") or name.endswith(k)]
        if len(match) != 1:
            match = [k for k, v in state.items() if v.shape == p.shape and torch.equal(v, p.data)]
        if len(match) != 1:
            raise RuntimeError(f"cannot map CrypTen parameter {name} to the torch state dict")
        keys.append(match[0])
    return model, keys


def comm_stats() -> dict[str, float]:
    """This party's cumulative CrypTen communication counters (rounds, bytes, seconds in comm)."""
    return dict(comm.get().get_communication_stats())


class DealerCounter:
    """Counts the part of party 0's CrypTen traffic that is requests to and answers from the TTP.

    CrypTen logs every collective in one counter; wrapping TTPClient.ttp_request (the only place
    a party talks to the dealer) lets the JSON separate party-to-party from dealer traffic.
    """

    rounds = 0.0
    bytes = 0.0

    @classmethod
    def install(cls) -> None:
        """Wrap the TTP client's request method (in this process only)."""
        client = ttp_provider.TTPClient._TTPClient__TTPClient
        if getattr(client.ttp_request, "_counted", False):
            return
        original = client.ttp_request

        @functools.wraps(original)
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            """ttp_request, adding its logged rounds and bytes to the dealer counters."""
            before = comm_stats()
            out = original(self, *args, **kwargs)
            after = comm_stats()
            cls.rounds += after["rounds"] - before["rounds"]
            cls.bytes += after["bytes"] - before["bytes"]
            return out

        counted._counted = True  # type: ignore[attr-defined]
        client.ttp_request = counted


def party(rank: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One computing party: encrypt model and rows, train, reveal weights to party 0."""
    data = np.load(cfg["data"])
    x = torch.from_numpy(np.ascontiguousarray(data["x"], dtype=np.float32)).reshape(-1, 784)[: cfg["n_train"]]
    y = torch.from_numpy(np.asarray(data["y"], dtype=np.int64))[: cfg["n_train"]]
    n = len(x)
    half = n // 2
    state = torch.load(cfg["init"], map_location="cpu") if rank == 0 else MLP().state_dict()
    # party 1 passes placeholder weights of the right shape; only party 0's values are encrypted
    model, keys = build_crypten_model(state, cfg["via"])
    model.encrypt(src=0)
    model.train()
    target = torch.nn.functional.one_hot(y, 10).float()
    # each data owner encrypts only its own rows; the other party passes a shape-only placeholder
    parts_x, parts_y = [], []
    for owner, (lo, hi) in enumerate(((0, half), (half, n))):
        parts_x.append(crypten.cryptensor(x[lo:hi] if rank == owner else torch.zeros(hi - lo, 784), src=owner))
        parts_y.append(crypten.cryptensor(target[lo:hi] if rank == owner else torch.zeros(hi - lo, 10), src=owner))
    xs, ys = crypten.cat(parts_x), crypten.cat(parts_y)
    opt = crypten.optim.SGD(model.parameters(), lr=cfg["lr"])
    if "orders" in data.files:
        orders = [torch.from_numpy(np.asarray(o, dtype=np.int64)) for o in data["orders"][: cfg["epochs"]]]
    else:
        g = torch.Generator().manual_seed(cfg["seed"])
        orders = [torch.randperm(n, generator=g) for _ in range(cfg["epochs"])]
    if len(orders) < cfg["epochs"] or any(len(o) != n for o in orders):
        raise ValueError("orders in the npz do not cover --epochs epochs of --n-train rows")
    times: list[float] = []
    cpu: list[float] = []
    traffic: list[dict[str, float]] = []
    for order in orders:
        for i in range(0, n, cfg["batch"]):
            idx = order[i : i + cfg["batch"]]
            before = {**comm_stats(), "dealer_rounds": DealerCounter.rounds, "dealer_bytes": DealerCounter.bytes}
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad()
            out = model(xs[idx])
            diff = out - ys[idx]
            loss = diff.square().sum().div(len(idx))
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            after = {**comm_stats(), "dealer_rounds": DealerCounter.rounds, "dealer_bytes": DealerCounter.bytes}
            traffic.append({k: after[k] - before[k] for k in after})
    revealed = {key: p.get_plain_text(dst=0) for key, p in zip(keys, model.parameters(), strict=True)}
    weights = {k: v.clone() for k, v in revealed.items()} if rank == 0 else None
    return {"rank": rank, "batch_times": times, "cpu_times": cpu, "traffic": traffic, "weights": weights}


def child(rank: int, cfg: dict[str, Any], rendezvous: str, out_dir: str) -> None:
    """Process entry point for party `rank` (or the TTP dealer when rank == WORLD_SIZE).

    Mirrors crypten.mpc.context._launch, but hands results back through files: its
    multiprocessing.Queue can deadlock on join once a result exceeds the pipe buffer.
    """
    torch.set_num_threads(1)
    # known noise: TTPServer calls crypten.init() again; from_pytorch uses the legacy ONNX exporter on purpose
    warnings.filterwarnings("ignore", message="CrypTen is already initialized")
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    os.environ.update({"WORLD_SIZE": str(WORLD_SIZE), "RANK": str(rank), "RENDEZVOUS": f"file://{rendezvous}",
                       "DISTRIBUTED_BACKEND": "gloo"})
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    try:
        crypten.init()
        if rank == WORLD_SIZE:
            ttp_provider.TTPServer()  # serves requests until the parties' uninit terminates it
            result: dict[str, Any] = {"rank": rank}
        else:
            DealerCounter.install()
            result = party(rank, cfg)
        crypten.uninit()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def launch(cfg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run 2 parties + TTP as forked processes; return each party's result (ranks 0..2)."""
    with tempfile.TemporaryDirectory(prefix="crypten_mnist_training_") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=child, args=(r, cfg, rendezvous, tmp)) for r in range(WORLD_SIZE + 1)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        # poll rather than join in order: if one process dies the others block in gloo forever
        while any(p.is_alive() for p in procs):
            failed = any(p.exitcode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                for p in procs:
                    p.join()
                if not failed:
                    raise TimeoutError(f"CrypTen run did not finish within {timeout} s")
                break
            time.sleep(0.2)
        codes = [p.exitcode for p in procs]
        if any(c != 0 for c in codes):
            raise RuntimeError(f"a CrypTen process failed (exit codes {codes}); see stderr")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE + 1)]


def accuracy(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Plaintext test accuracy (percent) of the revealed weights."""
    m = MLP()
    m.load_state_dict(state)
    with torch.no_grad():
        return 100.0 * float((m(x).argmax(1) == y).float().mean())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (timings differ between hosts), or "" if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def summarise(res: list[dict[str, Any]], cfg: dict[str, Any], wall: float) -> dict[str, Any]:
    """Per-batch means and medians (first batch excluded), traffic split, accuracy, versions."""
    p0, p1 = res[0], res[1]
    t = p0["batch_times"]
    steady = slice(1, None) if len(t) > 1 else slice(None)
    t_s = t[steady]
    tr0, tr1 = p0["traffic"][steady], p1["traffic"][steady]
    # CrypTen logs 8 bytes per element for every element a party sends or receives, so party-to-party
    # traffic appears in both parties' counters (halve the sum); the dealer's traffic only in party 0's.
    dealer_b = [a["dealer_bytes"] for a in tr0]
    between_b = [(a["bytes"] - a["dealer_bytes"] + b["bytes"]) / 2 for a, b in zip(tr0, tr1, strict=True)]
    data = np.load(cfg["data"])
    x_te = torch.from_numpy(np.ascontiguousarray(data["x_test"], dtype=np.float32)).reshape(-1, 784)
    y_te = torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64))
    return {
        "system": "CrypTen",
        "crypten_version": importlib.metadata.version("crypten"),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "config": {k: cfg[k] for k in ("epochs", "n_train", "batch", "lr", "seed", "via")},
        "setting": "2 parties + TTP dealer (crypten.cfg.mpc.provider='TTP'), gloo over 127.0.0.1, "
                   "1 torch thread per process, crypten.optim.SGD without grad_threshold",
        "shims": SHIMS,
        "n_test": len(y_te),
        "batches": len(t),
        "seconds_per_batch_mean": statistics.mean(t_s),
        "seconds_per_batch_median": statistics.median(t_s),
        "seconds_first_batch": t[0],
        "bytes_per_batch_total": statistics.mean(between_b) + statistics.mean(dealer_b),
        "bytes_per_batch_between_parties": statistics.mean(between_b),
        "bytes_per_batch_dealer": statistics.mean(dealer_b),
        "rounds_per_batch": statistics.mean(a["rounds"] for a in tr0),
        "rounds_per_batch_between_parties": statistics.mean(a["rounds"] - a["dealer_rounds"] for a in tr0),
        "dealer_requests_per_batch": statistics.mean(a["dealer_rounds"] for a in tr0) / 3,
        "seconds_in_communication_per_batch_party0": statistics.mean(a["time"] for a in tr0),
        # CPU seconds each party's process spends per batch: with 3 processes on few cores, the sum over
        # parties and dealer bounds the achievable time per batch from below
        "cpu_seconds_per_batch_party0": statistics.mean(p0["cpu_times"][steady]),
        "cpu_seconds_per_batch_party1": statistics.mean(p1["cpu_times"][steady]),
        "test_accuracy_revealed_weights": accuracy(p0["weights"], x_te, y_te),
        "wall_seconds_including_process_start_and_encryption": wall,
        "load_average_1min": os.getloadavg()[0],
        "counting_note": "CrypTen's communicator stats (crypten.cfg.communicator.verbose): 8 bytes per "
                         "element sent or received, one round per collective call; send_obj/recv_obj are "
                         "counted by sys.getsizeof. A TTP request is 3 calls (send_obj, recv_obj, "
                         "broadcast) in party 0's counter. Timing is party 0's zero_grad/forward/loss/"
                         "backward/step.",
        "batch_times": t,
    }


def main() -> None:
    """Parse arguments, run the three CrypTen processes, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="npz with x, y, x_test, y_test (optionally orders)")
    ap.add_argument("--init", required=True, help="torch state dict of the MLP to start from")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=640)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=1, help="batch order seed when the npz has no orders")
    ap.add_argument("--via", choices=("onnx", "direct"), default="onnx",
                    help="build the CrypTen model with crypten.nn.from_pytorch (onnx) or by hand (direct)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is killed")
    ns = ap.parse_args()
    cfg = {"data": str(Path(ns.data).resolve()), "init": str(Path(ns.init).resolve()), "epochs": ns.epochs,
           "n_train": ns.n_train, "batch": ns.batch, "lr": ns.lr, "seed": ns.seed, "via": ns.via}
    t0 = time.perf_counter()
    res = launch(cfg, ns.timeout)
    summary = summarise(res, cfg, time.perf_counter() - t0)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(summary, indent=2))
    print(f"CrypTen {summary['crypten_version']} (torch {summary['torch_version']}): "
          f"{summary['seconds_per_batch_median']:.3f} s/batch median, {summary['seconds_per_batch_mean']:.3f} mean, "
          f"{summary['bytes_per_batch_total'] / 1e6:.2f} MB/batch, {summary['rounds_per_batch']:.0f} rounds; "
          f"test accuracy {summary['test_accuracy_revealed_weights']:.1f}%; wrote {ns.out}", flush=True)


if __name__ == "__main__":
    main()
