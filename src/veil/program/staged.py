"""The `staged` circuit kind: interactive inference, with a network's linear stages on the server
and everything else on the client (as nGraph-HE2 ran MobileNetV2).

The artefact is a `StagedGraph` (the public description: values, client steps, stages, see
`veil.program.glue`) and one depth-0 affine circuit (`LinearCircuit`) per stage, each calibrated
on the values that stage reads on the calibration data.

Protocol, for rows X (one round trip per stage; the server keeps no state between them):
1. the client runs the steps of round 0 on X (those needing no answer from the server);
2. for stage s = 0, 1, ...: the client lays the values stage s reads end to end and checks them
   against the stage's accepted box (every element of a value up to twice that value's largest
   calibration magnitude, or the caller's input bounds for the model input): anything outside
   raises `PrecisionError` before anything is encrypted. It encrypts them in the stage's packing
   of the chosen layout, the header naming the stage (`stage`), and sends them. The server reads
   the stage from the header and refuses a request whose stage does not exist (`ShapeError`; a
   missing or malformed field is a `WireFormatError`), or whose layout, feature count,
   ciphertext count, scale or level are not that stage's (`ShapeError`, as for any affine
   request); otherwise it evaluates the stage's map W_s x + b_s and answers ciphertexts whose
   header names the stage again;
3. the client decrypts the answer (its header must name stage s, the layout and the rows it
   sent), checks every value against the stage's planned bound, max_j sum_f |W_jf| box_f + |b_j|
   with the weights as quantized, plus the inputs' rounding, ten standard deviations of CKKS
   noise and a 1e-3 margin (`planned_bound`: a value beyond it is impossible for an honest answer
   to an accepted request; it means wrap-around, other keys or a forged answer, and raises
   `PrecisionError`; a forged answer within the bound cannot be told from a true one), then runs
   round s + 1's steps, exactly, in float64;
4. after the last round the output value is the answer.

Error: each stage adds the affine circuit's error (fixed-point rounding of inputs and weights and
fresh CKKS noise: about 1e-7 of the stage's output bound at the default scales), which the
client's steps propagate without amplification for 1-Lipschitz layers (ReLU, MaxPool, GELU,
Sigmoid); nothing compounds through squares, so the network may be of any depth and its accuracy
is the plaintext network's.

What each side learns. The server: ciphertexts, how many per stage, and the rows per request: no
more than for any other kind. The client: the architecture (every value's shape, every step and
its parameters, which values each stage reads and gives; in the row layout, which inputs each
output of a convolution-like stage reads, i.e. its kernel geometry), each stage's accepted box
and output bound (the calibration data's range per intermediate feature), and every value it
decrypts: the inputs of every non-linear layer. That is far more than a prediction: one linear
stage is recovered from n_in + 1 chosen requests, so the whole model can be extracted stage by
stage. Weights of linear layers, and the slopes of PReLU and the affine parts of LayerNorm, stay
on the server. Use this kind where the client may learn the network's structure and activations.

Layouts: `batch` (every stage in the affine batch layout, two samples per slot: throughput) and
`row` (latency: per stage the affine `row` or `gather` layout, whichever was estimated cheaper
for one sample when compiling; `gather` suits convolutions). Every stage of a layout uses the
same parameters (`PRESET`), so the client holds one key per layout; only `row` stages need Galois
keys, none needs relinearization keys (depth 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.errors import KeyMaterialError, PrecisionError, ShapeError, WireFormatError
from veil.he import PublicBundle, SecretKeys, wire
from veil.he.params import CKKSParameters, preset
from veil.program.affine import DEFAULT_HEADROOM, FRESH_NOISE_STD, LinearCircuit, LinearClient, estimated_ms
from veil.program.common import KindInterface, Send, checked_layout, checked_rows
from veil.program.glue import StagedGraph
from veil.program.ir import Linear
from veil.program.kinds import CircuitKind, register
from veil.program.packing import LATENCY_LAYOUTS, PROGRAM_LAYOUTS, GatherLayout, RowLayout, gather_index
from veil.program.planner import INPUT_HEADROOM, check_box, input_box

KIND = "staged"
PRESET = "depth0-rotations"
"""N=4096, one 60-bit data prime and a special prime for the row layout's Galois keys: a batch of
4096 samples (two per slot) per ciphertext, 64 kB per ciphertext."""
OUTPUT_MARGIN = 1e-3


def value_box(X: np.ndarray, bounds: Any = None) -> np.ndarray:
    """The box a value is accepted in: `bounds` when given (per feature or one number), else every
    element up to INPUT_HEADROOM times the value's largest calibration magnitude over all its
    elements (per element would refuse ordinary inputs: an intermediate feature that is small on
    every calibration sample can be large on the next). No value can then overflow: the stage's
    scales are chosen for the whole box."""
    if bounds is not None:
        return input_box(X, bounds)
    peak = float(np.max(np.abs(X))) if X.size else 0.0
    return np.full(X.shape[1], INPUT_HEADROOM * peak if peak > 0 else 1.0)


def planned_bound(circuit: LinearCircuit, box: np.ndarray) -> float:
    """The largest |output| an honest evaluation of `circuit` can decrypt to for inputs in the box,
    in any of its layouts: the weights as quantized, inputs rounded to their scale, plus ten
    standard deviations of fresh CKKS noise (`LinearCircuit.simulate`'s model), with a relative
    margin of `OUTPUT_MARGIN`."""
    peak = 0.0
    for s in circuit.scales.values():
        Wq = np.abs(circuit.quantized(s.weight_bits))
        step = 2.0 ** -s.input_bits
        noise = FRESH_NOISE_STD * np.sqrt(s.params.poly_modulus_degree / 2) * step * np.linalg.norm(Wq, axis=1)
        peak = max(peak, float(np.max(Wq @ (box + step) + np.abs(circuit.bias) + 10.0 * noise)))
    return peak * (1.0 + OUTPUT_MARGIN) + 1e-6 * (1.0 + peak)


def latency_layout(op: Linear, support: np.ndarray | None, slots: int) -> str:
    """`row` or `gather`, whichever is estimated cheaper for one sample of this map (ShapeError if
    the map fits neither: wider than the row layout's blocks and too large a gather table)."""
    costs = {}
    with contextlib.suppress(ShapeError):  # wider than the row layout's blocks
        costs["row"] = estimated_ms(RowLayout(slots, op.n_in, op.n_out), 1)
    with contextlib.suppress(ShapeError):  # a gather table over MAX_GATHER_ENTRIES
        mask = op.weight != 0 if support is None else (op.weight != 0) | support
        costs["gather"] = estimated_ms(GatherLayout(slots, op.n_in, op.n_out, gather_index(mask)), 1)
    if not costs:
        raise ShapeError(f"a linear stage of {op.n_in} inputs and {op.n_out} outputs fits no single-sample layout")
    return min(costs, key=lambda k: (costs[k], k))


def compile_staged(graph: StagedGraph, maps: list[Linear], calibration: dict[int, np.ndarray],
                   supports: list[np.ndarray | None] | None = None, input_bounds: Any = None,
                   headroom: float = DEFAULT_HEADROOM) -> StagedCircuit:
    """The staged circuit of `graph` whose stage s computes `maps[s]`, calibrated on
    `calibration` (per value a client sends: its values (n, size) on the calibration data).
    `supports[s]` marks which weights of stage s the architecture allows to be non-zero (for the
    gather layout's public table); `input_bounds` bounds the model input (value 0)."""
    if len(maps) != len(graph.stages):
        raise ShapeError(f"{len(maps)} linear maps for {len(graph.stages)} stages")
    sent = {v for io in graph.stages for v in io.inputs}
    if not sent <= set(calibration):
        raise ShapeError(f"calibration values missing for values {sorted(sent - set(calibration))}")
    boxes_by_value = {v: value_box(np.asarray(calibration[v], dtype=np.float64), input_bounds if v == 0 else None)
                      for v in sent}
    slots = preset(PRESET).slot_count
    circuits, layouts, boxes, bounds = [], {name: [] for name in PROGRAM_LAYOUTS}, [], []
    for s, (io, op) in enumerate(zip(graph.stages, maps, strict=True)):
        X = np.concatenate([calibration[v] for v in io.inputs], axis=1)
        box = np.concatenate([boxes_by_value[v] for v in io.inputs])
        support = None if supports is None else supports[s]
        latency = latency_layout(op, support, slots)
        presets = {"batch": PRESET, "row": None, latency: PRESET}
        circuits.append(LinearCircuit.calibrate(op.weight, op.bias, X, headroom=headroom, presets=presets,
                                                input_bounds=box, support=support))
        layouts["batch"].append("batch")
        layouts["row"].append(latency)
        boxes.append(box)
        bounds.append(planned_bound(circuits[-1], box))
    return StagedCircuit(graph, circuits, {k: tuple(v) for k, v in layouts.items()}, boxes, bounds)


def _vectors(raw: object, sizes: list[int], what: str) -> list[np.ndarray]:
    """Per stage, a list of finite non-negative numbers of the stage's input width."""
    if not isinstance(raw, list) or len(raw) != len(sizes):
        raise WireFormatError(f"{what} must be a list with one entry per stage")
    out = []
    for row, size in zip(raw, sizes, strict=True):
        if not isinstance(row, list) or len(row) != size or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2.0**60 for v in row):
            raise WireFormatError(f"{what}: each stage needs {size} finite non-negative numbers")
        out.append(np.asarray(row, dtype=np.float64))
    return out


def _bounds(raw: object, n: int) -> list[float]:
    if not isinstance(raw, list) or len(raw) != n or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 2.0**60 for v in raw):
        raise WireFormatError("bounds must give one finite positive number per stage")
    return [float(v) for v in raw]


def _layouts(raw: object, n: int) -> dict[str, tuple[str, ...]]:
    """Per staged layout, the affine layout of each stage (batch: batch; row: row or gather)."""
    if not isinstance(raw, dict) or not raw or not set(raw) <= set(PROGRAM_LAYOUTS):
        raise WireFormatError(f"layouts must map some of {PROGRAM_LAYOUTS} to the layout of every stage")
    allowed = {"batch": ("batch",), "row": LATENCY_LAYOUTS}
    out = {}
    for name, names in raw.items():
        if not isinstance(names, list | tuple) or len(names) != n or not all(v in allowed[name] for v in names):
            raise WireFormatError(f"the {name} layout needs one of {allowed[name]} per stage")
        out[name] = tuple(names)
    return out


@dataclass(frozen=True)
class StagedPacking:
    """A layout of a staged program seen as one packing: each stage's affine packing, and the
    largest request and answer among them (what a request budget or a chunk is sized by:
    `veil.program.request_bytes`, `parallel.default_chunk_rows`)."""

    stages: tuple
    name: str

    def n_input_cts(self, n_samples: int) -> int:
        return max(p.n_input_cts(n_samples) for p in self.stages)

    def n_output_cts(self, n_samples: int) -> int:
        return max(p.n_output_cts(n_samples) for p in self.stages)


class StagedKind:
    """What both halves of a staged program answer alike: everything follows from the graph, the
    per-stage affine sides, the layout map, the boxes and the bounds."""

    kind = KIND
    depth = 0
    graph: StagedGraph
    stages: list[Any]
    layouts: dict[str, tuple[str, ...]]
    boxes: list[np.ndarray]
    bounds: list[float]

    @property
    def n_features(self) -> int:
        return self.graph.n_features

    @property
    def n_outputs(self) -> int:
        return self.graph.n_outputs

    def _check_parts(self) -> None:
        """The stages fit the graph, and each layout's stages share one parameter set."""
        n = len(self.graph.stages)
        if not len(self.stages) == len(self.boxes) == len(self.bounds) == n:
            raise WireFormatError(f"a staged program of {n} stages needs a circuit, a box and a bound per stage")
        for s, (side, io) in enumerate(zip(self.stages, self.graph.stages, strict=True)):
            if (side.n_features, side.n_outputs) != (self.graph.width(io.inputs), self.graph.width(io.outputs)):
                raise ShapeError(f"stage {s} maps {side.n_features} values to {side.n_outputs}; the graph says "
                                 f"{self.graph.width(io.inputs)} to {self.graph.width(io.outputs)}")
            if set(side.layout_params()) != {names[s] for names in self.layouts.values()}:
                raise WireFormatError(f"stage {s} holds the layouts {sorted(side.layout_params())}, the layout "
                                      "map names others")
            if len(self.boxes[s]) != side.n_features:
                raise ShapeError(f"stage {s}'s box has {len(self.boxes[s])} bounds for {side.n_features} inputs")
        for name, names in self.layouts.items():
            if len({side.layout_params()[n_].fingerprint for side, n_ in zip(self.stages, names, strict=True)}) != 1:
                raise WireFormatError(f"every stage of the {name} layout must use the same parameters")

    def layout_params(self) -> dict[str, CKKSParameters]:
        return {name: self.stages[0].layout_params()[names[0]] for name, names in self.layouts.items()}

    def layout(self, name: object) -> StagedPacking:
        """The packing of layout `name` (checked: it may come from an untrusted header)."""
        names = self.layouts[checked_layout(name, self.layouts)]
        return StagedPacking(tuple(side.layout(a) for side, a in zip(self.stages, names, strict=True)), str(name))

    def evaluation_keys(self, layout: str) -> tuple[bool, tuple[int, ...]]:
        """No relinearization; the Galois steps of every stage in the affine row layout."""
        names = self.layouts[checked_layout(layout, self.layouts)]
        steps: set[int] = set()
        for side, name in zip(self.stages, names, strict=True):
            steps |= set(side.evaluation_keys(name)[1])
        return False, tuple(sorted(steps))

    def agreement(self) -> dict[str, Any]:
        return {"graph": self.graph.to_dict(), "layouts": {k: list(v) for k, v in self.layouts.items()},
                "boxes": [b.tolist() for b in self.boxes], "bounds": list(self.bounds),
                "stages": [side.agreement() for side in self.stages]}

    def _parts_dict(self) -> dict:
        return {"kind": KIND, "graph": self.graph.to_dict(), "layouts": {k: list(v) for k, v in self.layouts.items()},
                "boxes": [b.tolist() for b in self.boxes], "bounds": list(self.bounds)}

    @staticmethod
    def _parse_parts(d: object, what: str) -> tuple[StagedGraph, list, dict, list, list]:
        if not isinstance(d, dict) or d.get("kind") != KIND or not isinstance(d.get("stages"), list):
            raise WireFormatError(f"not a staged {what}")
        graph = StagedGraph.from_dict(d.get("graph"))
        n = len(graph.stages)
        if len(d["stages"]) != n:
            raise WireFormatError(f"a staged {what} of {n} stages needs {n} stage circuits")
        boxes = _vectors(d.get("boxes"), [graph.width(io.inputs) for io in graph.stages], "boxes")
        return graph, d["stages"], _layouts(d.get("layouts"), n), boxes, _bounds(d.get("bounds"), n)

    def choose_layout(self, n_samples: int) -> str:
        """The layout with the lower estimated end-to-end time over all stages (ties: batch)."""
        costs = {name: sum(side.estimated_ms(a, n_samples) for side, a in zip(self.stages, names, strict=True))
                 for name, names in self.layouts.items()}
        return min(costs, key=lambda k: (costs[k], k != "batch"))


class _Rounds:
    """The client's half of the protocol (module docstring, steps 1-4) as a state machine: the
    values it holds and the next stage. Values no later round reads are dropped as it goes."""

    def __init__(self, side: StagedKind, X: np.ndarray) -> None:
        self.side, self.graph, self.n = side, side.graph, len(X)
        self.last = self.graph.last_rounds()
        self.values: dict[int, np.ndarray] = {0: X}
        self.stage = 0
        self.graph.run_round(self.values, 0)

    @property
    def done(self) -> bool:
        return self.stage == len(self.graph.stages)

    def inputs(self) -> np.ndarray:
        """The next stage's inputs, end to end, once checked against its box."""
        s, io = self.stage, self.graph.stages[self.stage]
        X = np.concatenate([self.values[v] for v in io.inputs], axis=1)
        check_box(X, self.side.boxes[s], f"stage {s} input ")
        for v in [v for v in self.values if self.last[v] <= s]:
            del self.values[v]
        return X

    def outputs(self, Y: np.ndarray) -> None:
        """Take the next stage's answer (checked against its bound) and run the next round."""
        s, io = self.stage, self.graph.stages[self.stage]
        peak = float(np.max(np.abs(Y))) if Y.size else 0.0
        if not peak <= self.side.bounds[s]:
            raise PrecisionError(f"stage {s} answered values up to {peak:.4g}, beyond its planned bound "
                                 f"{self.side.bounds[s]:.4g} for the inputs sent: the answer wrapped around the "
                                 "modulus, was computed under other keys or was forged; none of it is used")
        lo = 0
        for v in io.outputs:
            self.values[v] = Y[:, lo:lo + self.graph.size(v)]
            lo += self.graph.size(v)
        self.stage += 1
        self.graph.run_round(self.values, self.stage)

    def result(self) -> np.ndarray:
        return np.ascontiguousarray(self.values[self.graph.output], dtype=np.float64)


class StagedCircuit(StagedKind, KindInterface):
    """Server side: the graph and one affine circuit per stage (the weights stay here)."""

    def __init__(self, graph: StagedGraph, stages: list[LinearCircuit], layouts: dict[str, tuple[str, ...]],
                 boxes: list[np.ndarray], bounds: list[float]) -> None:
        self.graph, self.stages, self.layouts = graph, list(stages), dict(layouts)
        self.boxes, self.bounds = [np.asarray(b, dtype=np.float64) for b in boxes], [float(b) for b in bounds]
        self._check_parts()

    def prepare(self) -> StagedCircuit:
        for side in self.stages:
            side.prepare()
        return self

    def to_dict(self) -> dict:
        return {**self._parts_dict(), "stages": [side.to_dict() for side in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> StagedCircuit:
        graph, stages, layouts, boxes, bounds = cls._parse_parts(d, "circuit")
        return cls(graph, [LinearCircuit.from_dict(s) for s in stages], layouts, boxes, bounds)

    def client_spec(self) -> dict:
        """What a client needs: the public graph and each stage's affine client specification
        (parameters, scales, input limits; no weights)."""
        return {**self._parts_dict(), "stages": [side.client_spec() for side in self.stages]}

    def stage_of(self, header: dict) -> int:
        """The stage an untrusted request header names."""
        stage = header.get("stage")
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise WireFormatError("a request to a staged program names its stage: an integer header field 'stage'")
        if not 0 <= stage < len(self.stages):
            raise ShapeError(f"this program has stages 0 to {len(self.stages) - 1}; the request names stage {stage}")
        return stage

    def run(self, request: bytes, bundle: PublicBundle) -> bytes:
        """Evaluate the stage the request names (step 2 of the protocol); stateless."""
        msg = wire.decode(request, wire.Kind.CIPHERTEXTS)
        stage = self.stage_of(msg.header)
        return self.stages[stage].run(msg, bundle, extra={"stage": stage})

    def simulate(self, X: np.ndarray, layout: str = "batch", rng: np.random.Generator | None = None) -> np.ndarray:
        """The protocol without encryption: each stage's `LinearCircuit.simulate` (its quantization
        and noise), with the same checks and client steps."""
        names = self.layouts[checked_layout(layout, self.layouts)]
        rng = rng if rng is not None else np.random.default_rng()
        rounds = _Rounds(self, checked_rows(X, self.n_features))
        while not rounds.done:
            s = rounds.stage
            rounds.outputs(self.stages[s].simulate(rounds.inputs(), names[s], rng))
        return rounds.result()

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """The plaintext program: exact weights, the same client steps."""
        rounds = _Rounds(self, checked_rows(X, self.n_features))
        while not rounds.done:
            side = self.stages[rounds.stage]
            rounds.outputs(rounds.inputs() @ side.weights.T + side.bias)
        return rounds.result()


class StagedSession:
    """One run of the protocol for rows X through any transport: `request()` gives the next
    stage's request (None once the answer is complete), `receive(response)` takes its answer,
    `result()` the outputs."""

    def __init__(self, client: StagedClient, X: Any, layout: str) -> None:
        self.client = client
        self.layout = checked_layout(layout, client.layouts)
        client.keys(self.layout)  # every stage encrypts under the layout's one key
        self.rounds = _Rounds(client, client.check_input(X))
        self.pending = False

    def request(self) -> bytes | None:
        if self.rounds.done:
            return None
        s = self.rounds.stage
        if self.pending:
            raise ShapeError(f"the answer to stage {s} has not been received yet")
        request = self.client.stages[s].encrypt(self.rounds.inputs(), self.client.layouts[self.layout][s],
                                                extra={"stage": s})
        self.pending = True
        return request

    def receive(self, response: bytes) -> None:
        """Decrypt and check the answer to the pending request, then run the next round."""
        if not self.pending:
            raise ShapeError("no stage request is waiting for an answer")
        s = self.rounds.stage
        name = self.client.layouts[self.layout][s]
        msg = wire.decode(response, wire.Kind.CIPHERTEXTS)
        stage = msg.header.get("stage")
        if type(stage) is not int or stage != s or msg.header.get("layout") != name:
            raise ShapeError(f"the answer names stage {stage!r} in layout {msg.header.get('layout')!r}; the request "
                             f"was for stage {s} in {name!r}")
        try:
            Y = self.client.stages[s].decrypt(msg, self.rounds.n)
        except PrecisionError as exc:  # the stage kind's own output check (e.g. an affine stage's scales)
            raise PrecisionError(f"stage {s} answered values beyond what its scales hold, none of it is used: "
                                 f"{exc}") from None
        self.rounds.outputs(Y)
        self.pending = False

    def result(self) -> np.ndarray:
        if not self.rounds.done:
            raise ShapeError(f"the protocol stopped before stage {self.rounds.stage}")
        return self.rounds.result()


class StagedClient(StagedKind, KindInterface):
    """Client side: the graph, an affine client per stage (no weights), one key per layout."""

    def __init__(self, spec: dict) -> None:
        graph, stages, layouts, boxes, bounds = self._parse_parts(spec, "client specification")
        self.graph, self.layouts, self.boxes, self.bounds = graph, layouts, boxes, bounds
        self.stages = [LinearClient(s) for s in stages]
        self._check_parts()
        self.params = self.layout_params()
        self._keys: dict[str, SecretKeys] = {}

    def check_input(self, X: Any) -> np.ndarray:
        """Rows X, flattened, or samples in the model input's own shape (images (n, 1, 28, 28) as
        `forward` takes them), which are flattened first."""
        shape = self.graph.shapes[0]
        if len(shape) > 1 and np.ndim(X) == len(shape) + 1 and np.shape(X)[1:] == shape:
            X = np.reshape(X, (np.shape(X)[0], -1))
        return checked_rows(X, self.n_features)

    def _install(self, layout: str, keys: SecretKeys) -> None:
        for side, name in zip(self.stages, self.layouts[layout], strict=True):
            side.set_keys(name, keys)
        self._keys[layout] = keys

    def keys(self, layout: str) -> SecretKeys:
        """The layout's secret keys (one for every stage), generated on first use with the Galois
        keys of its row stages."""
        if layout not in self._keys:
            _, steps = self.evaluation_keys(layout)
            self._install(layout, SecretKeys.generate(self.params[layout], rotation_steps=steps))
        return self._keys[layout]

    def set_keys(self, layout: str, keys: SecretKeys) -> None:
        checked_layout(layout, self.layouts)
        if keys.params != self.params[layout]:
            raise ShapeError("these keys were made for other parameters")
        if set(self.evaluation_keys(layout)[1]) - set(keys.rotation_steps):
            raise KeyMaterialError("these keys lack Galois keys the program's row stages need")
        self._install(layout, keys)

    def public_bundle(self, layout: str) -> PublicBundle:
        return self.keys(layout).public_bundle()

    def session(self, X: Any, layout: str) -> StagedSession:
        return StagedSession(self, X, layout)

    def infer(self, X: Any, layout: str, send: Send) -> np.ndarray:
        """The whole protocol for rows X: one round trip through `send` per stage."""
        session = self.session(X, layout)
        while (request := session.request()) is not None:
            session.receive(send(request, layout))
        return session.result()


register(CircuitKind(KIND, StagedCircuit.from_dict, StagedClient,
                     "an interactive network: the server evaluates its linear stages, the client its other "
                     "layers, one stateless request per stage (the header names the stage)"))
