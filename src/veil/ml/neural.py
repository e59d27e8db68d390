"""Encrypted neural networks: scikit-learn-style MLPs and compiled torch modules.

`MLPClassifier` / `MLPRegressor` take scikit-learn's constructor parameters where they apply and
train a torch network whose activations are polynomials (CKKS evaluates only additions and
multiplications): `activation="square"` (x^2) or `"relu_poly"` (a quadratic fitted to ReLU on
[-RELU_BOUND, RELU_BOUND]). Inputs are standardized inside the network (folded into the first
layer, so clients send raw features), and regression targets are standardized and un-scaled in
the last layer. `fhe="disable"` evaluates the same polynomial network in plaintext.

`compile_torch_model(module, X)` compiles any supported module (see `torch_compile`) and returns
a `CompiledTorchModel` with `forward(X, fhe=...)`, as Concrete ML's function of the same name;
`nonlinear="client"` compiles any network (ReLU, MaxPool, GELU, ...) for interactive inference,
its non-linear layers computed by the client between encrypted linear stages.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data
from torch import nn

from veil.errors import ShapeError
from veil.ml.base import EncryptedClassifierMixin, EncryptedModelMixin, EncryptedRegressorMixin
from veil.ml.linear import fold_scaler, fold_standardization
from veil.ml.torch_compile import Square, module_to_program, module_to_staged, relu_polynomial
from veil.program import Circuit, Linear, Program, compile_program
from veil.program.common import real_array
from veil.program.outputs import OutputSpec
from veil.program.planner import DEFAULT_HEADROOM

ACTIVATIONS = ("square", "relu_poly")
RELU_BOUND = 4.0


class _EncryptedMLP(EncryptedModelMixin, BaseEstimator):
    """Shared training and compilation; subclasses define the loss and outputs."""

    _classifier = False

    def __init__(self, hidden_layer_sizes: tuple[int, ...] = (100,), activation: str = "relu_poly",
                 alpha: float = 1e-4, batch_size: int | str = "auto", learning_rate_init: float = 1e-3,
                 max_iter: int = 200, shuffle: bool = True, random_state: int | None = None,
                 tol: float = 1e-4, n_iter_no_change: int = 10, verbose: bool = False) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.verbose = verbose

    def _activation(self) -> nn.Module:
        if self.activation == "square":
            return Square()
        if self.activation == "relu_poly":
            return relu_polynomial(RELU_BOUND).float()
        raise ValueError(f"activation must be one of {ACTIVATIONS} (polynomials CKKS can evaluate), "
                         f"got {self.activation!r}")

    def _network(self, n_in: int, n_out: int) -> nn.Sequential:
        sizes = (self.hidden_layer_sizes,) if isinstance(self.hidden_layer_sizes, int) else self.hidden_layer_sizes
        layers: list[nn.Module] = []
        width = n_in
        for h in sizes:
            if int(h) < 1:
                raise ValueError(f"hidden layer sizes must be positive, got {sizes}")
            layers += [nn.Linear(width, int(h)), self._activation()]
            width = int(h)
        layers.append(nn.Linear(width, n_out))
        return nn.Sequential(*layers)

    def _targets(self, y: Any) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def fit(self, X: Any, y: Any) -> _EncryptedMLP:
        """Train the polynomial network with Adam (L2 penalty `alpha`); returns self. Training runs
        on one torch thread: these networks are small, and more threads only contend."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(X, y)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, X: Any, y: Any) -> _EncryptedMLP:
        X = validate_data(self, X, dtype=np.float64)
        target, n_out = self._targets(y)
        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
        Xs = torch.as_tensor((X - self.x_mean_) / self.x_scale_, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0 if self.random_state is None else int(self.random_state))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = self._network(X.shape[1], n_out)
        batch = min(200, len(X)) if self.batch_size == "auto" else max(1, min(int(self.batch_size), len(X)))
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate_init)
        loss_fn = nn.CrossEntropyLoss() if self._classifier else nn.MSELoss()
        best, stall, self.loss_curve_ = np.inf, 0, []
        for _ in range(int(self.max_iter)):
            order = torch.randperm(len(X), generator=gen) if self.shuffle else torch.arange(len(X))
            total = 0.0
            for idx in order.split(batch):
                opt.zero_grad()
                out = net(Xs[idx])
                penalty = sum((m.weight**2).sum() for m in net if isinstance(m, nn.Linear))
                loss = loss_fn(out, target[idx]) + self.alpha * penalty / (2 * len(X))
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            self.loss_curve_.append(total / len(X))
            if self.loss_curve_[-1] > best - self.tol:
                stall += 1
                if stall >= self.n_iter_no_change:
                    break
            else:
                best, stall = self.loss_curve_[-1], 0
        self.n_iter_ = len(self.loss_curve_)
        self.network_ = net.eval()
        self.program_ = self._to_program()
        self.output_spec_ = self._output_spec()
        self._forget_circuit()
        return self

    def _to_program(self) -> Program:
        """The trained network as a program on raw features (standardization folded in)."""
        net = module_to_program(self.network_, (self.n_features_in_,))
        first = net.ops[0]
        ops = [Linear(*fold_standardization(first.weight, first.bias, self.x_mean_, self.x_scale_)), *net.ops[1:]]
        return Program(self.n_features_in_, self._output_ops(ops))

    def _output_ops(self, ops: list) -> list:
        return ops

    def _output_spec(self) -> OutputSpec:
        raise NotImplementedError

    def compile(self, X: Any, input_bounds: float | np.ndarray | None = None,
                headroom: float = DEFAULT_HEADROOM, bounds: str = "sound") -> _EncryptedMLP:
        """Plan CKKS parameters for inputs like X (each feature up to twice its largest calibration
        magnitude, or `input_bounds`; `bounds` as in `compile_torch_model`); returns self."""
        X = self._check_X(X)
        self._set_circuit(compile_program(self.program_, X, input_bounds, headroom, bounds=bounds))
        return self

    def _plain_raw(self, X: np.ndarray) -> np.ndarray:
        return self.program_.evaluate(X)


class MLPClassifier(EncryptedClassifierMixin, _EncryptedMLP):
    """Multi-layer perceptron classifier with polynomial activations, for encrypted inference."""

    _classifier = True

    def _targets(self, y: Any) -> tuple[torch.Tensor, int]:
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError("MLPClassifier takes a 1-D array of labels")
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("MLPClassifier needs at least two classes")
        return torch.as_tensor(codes, dtype=torch.long), len(self.classes_)

    def _output_spec(self) -> OutputSpec:
        return OutputSpec("classifier", classes=tuple(self.classes_.tolist()), proba="softmax")



class MLPRegressor(EncryptedRegressorMixin, _EncryptedMLP):
    """Multi-layer perceptron regressor with polynomial activations, for encrypted inference."""

    def _targets(self, y: Any) -> tuple[torch.Tensor, int]:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (1, 2):
            raise ValueError("MLPRegressor takes a 1-D or 2-D target")
        Y = y.reshape(len(y), -1)
        self.y_mean_ = Y.mean(axis=0)
        self.y_scale_ = np.where(Y.std(axis=0) > 0, Y.std(axis=0), 1.0)
        self.n_outputs_ = Y.shape[1]
        self._ravel = y.ndim == 1
        return torch.as_tensor((Y - self.y_mean_) / self.y_scale_, dtype=torch.float32), Y.shape[1]

    def _output_ops(self, ops: list) -> list:
        last = ops[-1]
        return [*ops[:-1], Linear(last.weight * self.y_scale_[:, None], last.bias * self.y_scale_ + self.y_mean_)]

    def _output_spec(self) -> OutputSpec:
        return OutputSpec("regressor", ravel=self._ravel)



NONLINEAR = ("server", "client")
REFERENCE_ROWS = 4096
"""Rows the plaintext reference of an interactive model runs at once (its activations are wide)."""


class CompiledTorchModel(EncryptedModelMixin):
    """A compiled torch module: `forward(X, fhe=...)` returns its raw outputs, flattened per sample.
    With `nonlinear="server"` the reference (`fhe="disable"`) is the lowered program, with
    `"client"` the module itself in float64."""

    def __init__(self, module: nn.Module, program: Program | None, input_shape: tuple[int, ...],
                 circuit: Circuit, nonlinear: str = "server") -> None:
        self.module = module
        self.program_ = program
        self.input_shape = tuple(input_shape)
        self.nonlinear = nonlinear
        self.circuit_ = circuit
        self.output_spec_ = OutputSpec("regressor", ravel=False)

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    def _check_X(self, X: Any, encrypted: bool = False) -> np.ndarray:
        """X as float64 rows (n, n_inputs), else ShapeError: for the plaintext and simulated modes
        also when it holds NaN or infinity, which they would otherwise return as NaN outputs (the
        encrypted path leaves finiteness to the client's per-chunk check, as the estimators do)."""
        X = real_array(X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X)
        if X.ndim < 1 or (X.shape[1:] != self.input_shape and X.shape[1:] != (self.n_inputs,)):
            raise ShapeError(f"expected inputs of shape (n, {', '.join(map(str, self.input_shape))}), got {X.shape}")
        if not encrypted and not np.all(np.isfinite(X)):
            raise ShapeError("inputs contain NaN or infinite values")
        return X.reshape(len(X), -1)

    def _plain_raw(self, X: np.ndarray) -> np.ndarray:
        if self.program_ is not None:
            return self.program_.evaluate(X)
        reference = copy.deepcopy(self.module).double().eval()
        out = []
        with torch.no_grad():
            for lo in range(0, len(X), REFERENCE_ROWS):
                block = torch.as_tensor(X[lo:lo + REFERENCE_ROWS]).reshape(-1, *self.input_shape)
                y = reference(block)
                out.append(y.reshape(len(block), -1).numpy())
        return np.concatenate(out)

    def forward(self, X: Any, fhe: str = "disable", layout: str = "auto",
                workers: int | None = None, executor: Any = None) -> np.ndarray:
        """Outputs of the module on X (n, *input_shape): in plaintext, simulated or encrypted
        (large inputs in chunks over `workers` local processes, as the estimators' predict)."""
        return self._raw(X, fhe, layout, workers, executor)

    __call__ = forward


def compile_torch_model(module: nn.Module, X_calibration: Any, input_bounds: float | np.ndarray | None = None,
                        headroom: float = DEFAULT_HEADROOM, bounds: str = "sound",
                        nonlinear: str = "server", non_negative: bool = False) -> CompiledTorchModel:
    """Compile `module` (in eval mode) for encrypted inference on inputs like `X_calibration`.

    `nonlinear="server"` (non-interactive): the server evaluates the whole network under CKKS, so
    its activations must be polynomials (`veil.ml.Square`, `veil.ml.Polynomial`); residual adds
    and concatenations are supported. `bounds` then says what the ring is sized for: "sound" (the
    default) the outputs of every input in the accepted box (`input_bounds`, or twice the
    calibration range per feature), by interval arithmetic; "calibrated" the values each stage
    reaches on `X_calibration` times `headroom`, for networks whose sound bounds no ring holds:
    inputs unlike the calibration data may then push an output out of range, which the client
    detects and reports as `PrecisionError`. `non_negative=True` declares the accepted inputs
    non-negative (the box [0, bound], e.g. pixels in [0, 1]): tighter sound bounds and a smaller
    ring or faster plan, the client refusing negative inputs.

    `nonlinear="client"` (interactive, `veil.program.staged`): the server evaluates each run of
    linear layers on ciphertexts and the client every other layer (ReLU, MaxPool, GELU, Sigmoid,
    Softmax, ...) exactly, one round trip per non-linear stage; the client then learns the
    architecture and the intermediate activations. Calibration fixes the range each stage
    accepts: each value up to twice its largest calibration magnitude (`input_bounds` for the
    model input), and the client refuses anything beyond it with `PrecisionError`; every stage is
    depth 0 with sound bounds over that range, so `bounds` does not apply."""
    if nonlinear not in NONLINEAR:
        raise ValueError(f"nonlinear must be one of {NONLINEAR}, got {nonlinear!r}")
    X = X_calibration.detach().cpu().numpy() if isinstance(X_calibration, torch.Tensor) else np.asarray(X_calibration)
    if X.ndim < 2 or len(X) == 0:
        raise ShapeError("X_calibration must hold at least one sample: shape (n, *input_shape)")
    if input_bounds is not None and np.ndim(input_bounds) > 0:
        input_bounds = np.asarray(input_bounds, dtype=np.float64).reshape(-1)
    shape = tuple(X.shape[1:])
    if nonlinear == "client":
        if not np.all(np.isfinite(X)):
            raise ShapeError("calibration data contain NaN or infinite values")
        _, circuit = module_to_staged(module, np.asarray(X, dtype=np.float64), input_bounds, headroom)
        return CompiledTorchModel(copy.deepcopy(module).eval(), None, shape, circuit, nonlinear)
    program = module_to_program(module, shape)
    flat = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    circuit = compile_program(program, flat, input_bounds, headroom, bounds=bounds, non_negative=non_negative)
    return CompiledTorchModel(copy.deepcopy(module).eval(), program, shape, circuit, nonlinear)


def mlp_from_torch(module: nn.Module, classes: Any = None, scaler: Any = None) -> MLPClassifier | MLPRegressor:
    """A fitted `MLPClassifier` (with `classes`, one logit per class) or `MLPRegressor` (without)
    that evaluates the trained torch network `module` (Linear layers and polynomial activations)
    exactly; a fitted affine `scaler` in front of it (StandardScaler, MinMaxScaler, MaxAbsScaler)
    is folded into the first layer so clients send raw features. Used to deploy networks trained
    elsewhere, e.g. federatedly: call `compile(X)` then `predict(..., fhe=...)` or `save`."""
    first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise TypeError("the network has no nn.Linear layer")
    n_in = first.in_features
    program = module_to_program(copy.deepcopy(module).eval().float(), (n_in,))
    ops = list(program.ops)
    if not isinstance(ops[0], Linear):
        raise TypeError("the network must begin with an nn.Linear layer")
    if scaler is not None:
        W, b = fold_scaler(scaler, ops[0].weight, ops[0].bias)
        ops[0] = Linear(W, b)
    program = Program(n_in, ops)
    est: MLPClassifier | MLPRegressor
    if classes is not None:
        est = MLPClassifier(hidden_layer_sizes=tuple(op.n_out for op in ops[:-1] if isinstance(op, Linear)))
        est.classes_ = np.asarray(classes)
        if len(est.classes_) != program.n_outputs:
            raise ShapeError(f"{len(est.classes_)} classes for a network with {program.n_outputs} outputs")
        est.output_spec_ = OutputSpec("classifier", classes=tuple(est.classes_.tolist()), proba="softmax")
    else:
        est = MLPRegressor(hidden_layer_sizes=tuple(op.n_out for op in ops[:-1] if isinstance(op, Linear)))
        est.n_outputs_ = program.n_outputs
        est.output_spec_ = OutputSpec("regressor", ravel=program.n_outputs == 1)
    est.n_features_in_ = n_in
    est.network_ = copy.deepcopy(module).eval()
    est.program_ = program
    return est


__all__ = ["CompiledTorchModel", "MLPClassifier", "MLPRegressor", "compile_torch_model", "mlp_from_torch"]
