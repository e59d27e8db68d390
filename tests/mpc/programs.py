"""Party programs run in separate processes by tests/mpc/test_processes.py."""

import os
import time
from pathlib import Path

import torch

import veil.mpc as mpc
from veil.mpc import primitives as P


def products(n: int) -> list[float]:
    """n secure products of shared values; party 0 gets the revealed results."""
    rt = mpc.current()
    x = mpc.share(torch.arange(4.0) if rt.rank == 0 else None, 0, shape=(4,))
    y = mpc.share(torch.full((4,), 0.5) if rt.rank == 1 else None, 1, shape=(4,))
    out = []
    for _ in range(n):
        z = (x * y).reveal(0)
        out.append(None if z is None else z.tolist())
    return out


def crash(rank_to_crash: int, marker: str) -> None:
    """Party ``rank_to_crash`` dies abruptly in the middle of a protocol; the others keep computing."""
    rt = mpc.current()
    x = mpc.share(torch.randn(64, 64) if rt.rank == 0 else None, 0, shape=(64, 64))
    for i in range(100000):
        if i == 5:
            Path(marker + str(rt.rank)).write_text("running")
            if rt.rank == rank_to_crash:
                os._exit(17)
        x = mpc.MPCTensor(P.relu(rt, x._share)[0])


def hang(rank_to_hang: int) -> None:
    """Party ``rank_to_hang`` stops answering (but stays alive); the others must time out."""
    rt = mpc.current()
    x = mpc.share(torch.randn(8) if rt.rank == 0 else None, 0, shape=(8,))
    if rt.rank == rank_to_hang:
        time.sleep(600)
    for _ in range(10):
        x = x * x


def key_material() -> dict:
    """A product of two distinctive secrets revealed to party 0; returns this party's key material."""
    rt = mpc.current()
    x = mpc.share(torch.full((256,), 1234.5678) if rt.rank == 0 else None, 0, shape=(256,))
    y = mpc.share(torch.full((256,), -8.25) if rt.rank == 1 else None, 1, shape=(256,))
    z = (x * y).reveal(0)
    return {"dealer_key": rt.dealer.key, "common_key": rt.common.key, "z": z, "stats": rt.stats()}


def stream(marker: str) -> float:
    """Rank 0 streams 32 MB messages to rank 1 (a one-way transfer, as sharing a large input is)."""
    rt = mpc.current()
    x = torch.ones(1 << 22, dtype=torch.int64)
    t0 = time.time()
    for i in range(200):
        if rt.rank == 0:
            rt.comm.send(x, 1)
        elif rt.rank == 1:
            rt.comm.recv(x.shape, torch.int64, 0)
        if i == 1:
            Path(marker + str(rt.rank)).write_text("streaming")
    P.open_ring(rt, torch.zeros(1, dtype=torch.int64))
    return time.time() - t0


def train_from_share_files(files: dict, pki_dir: str, holder: str, out_dir: str, steps: int = 3) -> bool:
    """The party program of the data-owner workflow: read this party's share files (owners' data and the model), train
    a linear model, write the loss and weights encrypted to the holder. Nothing else leaves."""
    import torch.nn.functional as F
    from torch import nn

    from veil.mpc.certs import TLSFiles
    from veil.mpc.nn import share_module
    from veil.mpc.sharefile import read_shares, write_result

    rt = mpc.current()
    label = f"party{rt.rank}"
    me = TLSFiles(Path(pki_dir) / "ca.pem", Path(pki_dir) / f"{label}.pem", Path(pki_dir) / f"{label}.key")
    data = [read_shares(f, me) for f in files[rt.rank]["data"]]
    model = read_shares(files[rt.rank]["model"], me)
    x = mpc.MPCTensor(torch.cat([d["x"]._share for d in data]))
    y = mpc.MPCTensor(torch.cat([d["y"]._share for d in data]))
    net = share_module(nn.Linear(x.shape[1], 1), 0)  # placeholder values, replaced by the owner's weights
    with torch.no_grad():
        net.weight.data = model["weight"]
        net.bias.data = model["bias"]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        opt.step()
    write_result({"loss": loss.detach(), "weight": net.weight.detach(), "bias": net.bias.detach()},
                 Path(pki_dir) / f"owner-{holder}.pem", out_dir, "result", me)
    return True


def echo_args(*args) -> list[str]:
    """What this party was handed (types only)."""
    return [type(a).__name__ for a in args]
