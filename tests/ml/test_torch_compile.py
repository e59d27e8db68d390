"""compile_torch_model: a digits CNN reaches 97% encrypted, user modules lower exactly (residual
adds and concatenations included, without interaction), and unsupported layers are named with
what to use instead."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from tests.ml.datasets import train
from veil import ml
from veil.errors import ShapeError
from veil.ml.torch_compile import UnsupportedLayerError, module_to_program
from veil.program.ir import Poly


@pytest.fixture(scope="module")
def digits_images():
    X, y = load_digits(return_X_y=True)
    X = X.reshape(-1, 1, 8, 8) / 16.0
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def test_digits_cnn_reaches_97_percent_encrypted(digits_images):
    Xtr, Xte, ytr, yte = digits_images
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), ml.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(72, 10))
    train(net, Xtr, ytr, epochs=60)
    model = ml.compile_torch_model(net, Xtr, input_bounds=1.0)
    enc = model.forward(Xte, fhe="execute", layout="batch")
    plain = model.forward(Xte)
    with torch.no_grad():
        reference = net(torch.tensor(Xte, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(plain, reference, atol=1e-4)
    np.testing.assert_allclose(enc, plain, atol=1e-4 * np.abs(plain).max())
    assert np.mean(enc.argmax(1) == plain.argmax(1)) >= 0.995
    assert np.mean(enc.argmax(1) == yte) >= 0.97
    one = model.forward(torch.tensor(Xte[:1]), fhe="execute", layout="row")
    np.testing.assert_allclose(one, plain[:1], atol=1e-4 * np.abs(plain).max())


def test_lowering_is_exact_for_batchnorm_pooling_and_custom_modules():
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
            self.bn = nn.BatchNorm2d(3)
            self.act = ml.Polynomial(0.1, 0.5, 0.25)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            x = self.pool(self.act(self.bn(self.conv(x))))
            x = x.view(x.shape[0], -1)
            x = self.fc(x)
            return x * x

    net = Net()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net.eval()
    X = torch.randn(30, 2, 6, 6)
    program = module_to_program(net, (2, 6, 6))
    with torch.no_grad():
        ref = net(X).double().numpy()
    np.testing.assert_allclose(program.evaluate(X.reshape(30, -1).double().numpy()), ref, rtol=1e-5, atol=1e-5)
    model = ml.compile_torch_model(net, X)
    np.testing.assert_allclose(model.forward(X[:6], fhe="execute"), ref[:6], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.forward(X[:6], fhe="simulate"), ref[:6], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("layer", "hint"), [
    (nn.ReLU(), "replace_relu"), (nn.MaxPool2d(2), "AvgPool2d"), (nn.Sigmoid(), "Polynomial"),
    (nn.Softmax(dim=1), "after decryption"), (nn.LSTM(3, 3), "supported"),
])
def test_unsupported_layers_are_named_with_what_to_use(layer, hint):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten())
    with pytest.raises(UnsupportedLayerError, match=hint) as err:
        ml.compile_torch_model(net, torch.randn(4, 1, 5, 5))
    assert "layer 1" in str(err.value)


def test_branches_compile_and_untraceable_or_unsupported_modules_are_refused():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Product(Branch):
        def forward(self, x):
            return self.a(x) * self.b(x)

    class Pair(Branch):
        def forward(self, x):
            return self.a(x), self.b(x)

    X = torch.randn(8, 3)
    branch = Branch().eval()
    model = ml.compile_torch_model(branch, X)  # a sum of two branches is one affine map
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(X[:4], fhe="execute"), branch(X[:4]).numpy(), atol=1e-4)
    with pytest.raises(UnsupportedLayerError, match="nonlinear='client'"):
        ml.compile_torch_model(Product(), X)  # a product of two values is no polynomial activation
    with pytest.raises(UnsupportedLayerError, match="one tensor"):
        ml.compile_torch_model(Pair(), X)
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        ml.compile_torch_model(bn, torch.randn(4, 3))
    with pytest.raises(ShapeError):
        ml.compile_torch_model(nn.Linear(3, 2), torch.randn(3))
    with pytest.raises(ShapeError, match=r"samples of shape \(4,\): mat1 and mat2 shapes cannot be multiplied"):
        ml.compile_torch_model(nn.Linear(3, 2), torch.randn(8, 4))  # one line, not torch.fx's trace
    model = ml.compile_torch_model(nn.Linear(3, 2), torch.randn(8, 3))
    with pytest.raises(ShapeError):
        model.forward(np.zeros((2, 4)))
    for fhe in ("disable", "simulate", "execute"):
        with pytest.raises(ShapeError, match="NaN"):
            model.forward(np.array([[0.0, np.nan, 1.0]]), fhe=fhe)  # never NaN outputs
        with pytest.raises(ShapeError, match="real numbers"):
            model.forward(np.array([["a", "b", "c"]]), fhe=fhe)


def test_replace_relu_swaps_and_fine_tunes(digits_images):
    Xtr, Xte, ytr, yte = digits_images
    torch.manual_seed(0)
    relu_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train(relu_net, Xtr, ytr, epochs=30)
    poly_net = ml.replace_relu(relu_net, Xtr, ytr, epochs=10)
    assert not any(isinstance(m, nn.ReLU) for m in poly_net.modules())
    assert any(isinstance(m, ml.Polynomial) for m in poly_net.modules())
    with torch.no_grad():
        acc_relu = (relu_net(torch.tensor(Xte, dtype=torch.float32)).argmax(1).numpy() == yte).mean()
    model = ml.compile_torch_model(poly_net, Xtr, input_bounds=1.0)
    acc_enc = (model.forward(Xte, fhe="execute").argmax(1) == yte).mean()
    assert acc_enc >= acc_relu - 0.02


class SkipAndConcat(nn.Module):
    """Squares with a residual add past the second and a concatenation of both depths."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        h = self.conv1(x) ** 2
        y = self.bn(self.conv2(h)) + x  # the input rides past the first square
        z = torch.cat([y * y, h], dim=1)  # h rides past the second
        return self.fc(torch.flatten(self.pool(z), 1))


def test_residual_and_concatenation_networks_run_without_interaction(digits_images):
    Xtr, Xte, _, _ = digits_images
    torch.manual_seed(0)
    net = SkipAndConcat()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    program = module_to_program(net, (1, 8, 8))
    polys = [op for op in program.ops if isinstance(op, Poly)]
    assert len(polys) == 2 and not any(p.is_uniform for p in polys)  # carried elements are the identity
    X = torch.tensor(Xte[:60], dtype=torch.float32)
    with torch.no_grad():
        ref = net(X).numpy()
    np.testing.assert_allclose(program.evaluate(X.reshape(60, -1).double().numpy()), ref, rtol=1e-4, atol=1e-4)
    model = ml.compile_torch_model(net, Xtr, input_bounds=1.0)
    assert set(model.circuit_.plans) == {"batch"}  # per-element polynomials: one ciphertext per element
    enc = model.forward(Xte[:60], fhe="execute")
    np.testing.assert_allclose(enc, ref, atol=1e-3 * np.abs(ref).max())
    assert np.mean(enc.argmax(1) == ref.argmax(1)) >= 0.995
    with pytest.raises(ShapeError, match="unknown layout"):
        model.forward(Xte[:1], fhe="execute", layout="row")
