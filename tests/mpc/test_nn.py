"""Ordinary torch.nn modules, losses, autograd and optimizers on secret-shared tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from benchmarks.mpc_models import SmallResNet
from torch import nn

import veil.mpc as mpc
from veil.mpc.nn import load_shares, reveal_module, save_shares, share_columns, share_module, share_rows


def _train_both(net, x, y, make_opt, loss_fn, steps, n_parties=2, target_src=1):
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters())
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        opt.step()

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0)
        ys = mpc.share(y if rt.rank == target_src else None, target_src)
        o = make_opt(m.parameters())
        for _ in range(steps):
            o.zero_grad()
            lo = loss_fn(m(xs), ys)
            lo.backward()
            o.step()
        return reveal_module(m, 0), lo.reveal(0)

    out = mpc.run_local(prog, n_parties=n_parties)
    return ref, loss, out[0]


@pytest.mark.parametrize("n_parties", [2, 3])
def test_mlp_sgd_momentum_matches_plaintext(n_parties):
    torch.manual_seed(0)
    x, y = torch.randn(32, 20), F.one_hot(torch.randint(0, 4, (32,)), 4).float()
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    ref, loss, (state, mloss) = _train_both(
        net, x, y, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), F.mse_loss, 4, n_parties
    )
    assert abs(float(mloss) - loss.item()) < 1e-3
    for k, v in ref.state_dict().items():
        assert (state[k] - v).abs().max() < 2e-3, k


def test_square_activation_and_residual_add():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h * h + x)

    torch.manual_seed(1)
    x, y = torch.randn(16, 6) * 0.5, torch.randn(16, 2)
    ref, loss, (state, mloss) = _train_both(Net(), x, y, lambda p: torch.optim.SGD(p, lr=0.05), F.mse_loss, 3)
    assert abs(float(mloss) - loss.item()) < 1e-3
    for k, v in ref.state_dict().items():
        assert (state[k] - v).abs().max() < 2e-3, k


def test_cnn_gradients_match_plaintext():
    torch.manual_seed(2)
    net = SmallResNet(c=4, size=8)
    net.eval()  # dropout off: gradients are compared exactly
    x, y = torch.rand(6, 1, 8, 8), F.one_hot(torch.randint(0, 10, (6,)), 10).float()
    ref = copy.deepcopy(net)
    F.mse_loss(ref(x), y).backward()

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0)
        ys = mpc.share(y if rt.rank == 1 else None, 1)
        F.mse_loss(m(xs), ys).backward()
        return {n: p.grad.reveal(0) for n, p in m.named_parameters()}

    grads = mpc.run_local(prog)[0]
    for n, p in ref.named_parameters():
        assert (grads[n] - p.grad).abs().max() < 2e-3 + 0.02 * p.grad.abs().max(), n


def test_batchnorm_eval_and_dropout():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten())
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    net[1].bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(4, 2, 5, 5)
    want = net(x)
    drop = nn.Dropout(0.5)

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0, requires_grad=True)
        out = m(xs).reveal(0)
        d = drop(xs)
        (g,) = torch.autograd.grad(d.sum(), xs)
        return out, d.reveal(0), g.reveal(0)

    out, dropped, grad = mpc.run_local(prog)[0]
    assert (out - want).abs().max() < 0.02
    kept = dropped != 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.allclose(dropped[kept], 2 * x[kept], atol=1e-3)
    assert torch.allclose(grad, kept.float() * 2, atol=1e-3)


def test_cross_entropy_one_hot_and_class_index_targets():
    torch.manual_seed(4)
    logits = torch.randn(8, 5) * 2
    labels = torch.randint(0, 5, (8,))
    onehot = F.one_hot(labels, 5).float()
    lx = logits.clone().requires_grad_()
    want = F.cross_entropy(lx, labels)
    (want_grad,) = torch.autograd.grad(want, lx)

    def prog():
        rt = mpc.current()
        xs = mpc.share(logits if rt.rank == 0 else None, 0, requires_grad=True)
        ts = mpc.share(onehot if rt.rank == 1 else None, 1)
        a = F.cross_entropy(xs, ts)
        (ga,) = torch.autograd.grad(a, xs)
        b = F.cross_entropy(xs, labels)
        (gb,) = torch.autograd.grad(b, xs)
        return a.reveal(0), ga.reveal(0), b.reveal(0), gb.reveal(0)

    a, ga, b, gb = mpc.run_local(prog)[0]
    for loss, grad in ((a, ga), (b, gb)):
        assert abs(float(loss) - want.item()) < 0.05
        assert (grad - want_grad).abs().max() < 0.01


def test_horizontal_and_vertical_splits_and_save_load(tmp_path):
    torch.manual_seed(6)
    data = torch.randn(10, 6)
    net = nn.Linear(6, 3)

    def prog():
        rt = mpc.current()
        rows = share_rows({0: data[:4], 1: data[4:]}[rt.rank], [0, 1], [4, 6], 6)
        cols = share_columns({0: data[:, :2], 1: data[:, 2:]}[rt.rank], [0, 1], 10, [2, 4])
        m = share_module(copy.deepcopy(net), 0)
        save_shares(m, tmp_path / f"model{rt.rank}.pt")
        save_shares(rows, tmp_path / f"rows{rt.rank}.pt")
        m2 = load_shares(tmp_path / f"model{rt.rank}.pt", into=nn.Linear(6, 3))
        rows2 = load_shares(tmp_path / f"rows{rt.rank}.pt")
        return rows.reveal(0), cols.reveal(0), m2(rows2).reveal(0)

    r, c, out = mpc.run_local(prog)[0]
    assert torch.allclose(r, data, atol=1e-4) and torch.allclose(c, data, atol=1e-4)
    assert torch.allclose(out, net(data), atol=1e-3)
    one = torch.load(tmp_path / "model0.pt", weights_only=True)["shares"]["weight"]
    assert (one.double() / 2**16 - net.weight.double()).abs().min() > 1.0  # a single file is no plaintext


def test_implicit_reveal_is_refused():
    def prog():
        rt = mpc.current()
        t = mpc.share(torch.ones(3) if rt.rank == 0 else None, 0)
        with pytest.raises(mpc.ProtocolError):
            t.sum().item()
        with pytest.raises(mpc.ProtocolError):
            bool((t > 0).all())
        return True

    assert mpc.run_local(prog) == [True, True]


def test_relu_backward_twice_with_retained_graph():
    # the fused backward consumes a one-time dealer pair; a second backward must still be right
    x = torch.linspace(-3, 3, 25)

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, requires_grad=True)
        y = (F.relu(xs) * torch.arange(25.0)).sum()
        (g1,) = torch.autograd.grad(y, xs, retain_graph=True)
        (g2,) = torch.autograd.grad(y, xs)
        return g1.reveal(0), g2.reveal(0)

    g1, g2 = mpc.run_local(prog)[0]
    want = (x >= 0).float() * torch.arange(25.0)
    assert torch.allclose(g1, want, atol=1e-3) and torch.allclose(g2, want, atol=1e-3)
