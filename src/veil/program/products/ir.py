"""The `ProductSum` form: per output c, f_c(x) = base_c + sum over its terms t of
v_t * prod_j lambda_{t,j}(x), literals lambda affine in the inputs and 0/1 on valid inputs; its
plaintext reference, bound, batch-layout lowering to the IR, and strict parsing."""

from __future__ import annotations

import math

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he.wire import strict_int
from veil.program.ir import MAX_DIM, Linear, Poly, Program

MAX_FACTORS = 16
MAX_LITERAL_TERMS = 8
MAX_DENSE = 1 << 25
"""Largest first-stage matrix (entries) a product sum may lower to: a forged artefact is refused
at load instead of allocating gigabytes."""

Literal = tuple[float, tuple[tuple[int, float], ...]]

class ProductSum:
    """Literals (affine 0/1 forms of the inputs), terms (literal indices per factor, -1 for the
    constant 1; 2^R factors each), a value and an output per term, and a base per output."""

    def __init__(self, n_inputs: int, literals: list[Literal], factors: np.ndarray, values: np.ndarray,
                 outputs: np.ndarray, base: np.ndarray, groups: np.ndarray | None = None) -> None:
        self.n_inputs = strict_int(n_inputs, "n_inputs", 1, MAX_DIM, ShapeError)
        self.literals = [(float(c), tuple((int(i), float(w)) for i, w in terms)) for c, terms in literals]
        for c, terms in self.literals:
            if not terms or len(terms) > MAX_LITERAL_TERMS or not math.isfinite(c) or any(
                    not 0 <= i < self.n_inputs or not math.isfinite(w) for i, w in terms):
                raise ShapeError(f"a literal holds 1 to {MAX_LITERAL_TERMS} finite weights on the inputs")
        self.factors = np.asarray(factors, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.outputs = np.asarray(outputs, dtype=np.int64).reshape(-1)
        self.base = np.asarray(base, dtype=np.float64).reshape(-1)
        n_terms = len(self.values)
        if self.factors.ndim != 2 or self.factors.shape[0] != n_terms or not 0 < n_terms <= MAX_DIM:
            raise ShapeError("factors must be a (terms x 2^R) matrix of literal indices, one row per value")
        width = self.factors.shape[1]
        if width < 2 or width > MAX_FACTORS or width & (width - 1):
            raise ShapeError(f"terms have 2^R factors, 2 <= 2^R <= {MAX_FACTORS}, got {width}")
        if self.factors.min() < -1 or self.factors.max() >= len(self.literals) or np.any(np.all(self.factors < 0, 1)):
            raise ShapeError("factor indices must name literals (or -1), and every term needs a literal")
        if not 0 < len(self.base) <= MAX_DIM or self.outputs.shape != (n_terms,) or self.outputs.min() < 0 \
                or self.outputs.max() >= len(self.base):
            raise ShapeError("every term must name one of the outputs")
        if not (np.all(np.isfinite(self.values)) and np.all(np.isfinite(self.base))):
            raise ShapeError("values and base must be finite")
        self.groups = (np.arange(n_terms) if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1))
        if self.groups.shape != (n_terms,) or self.groups.min() < 0 or self.groups.max() >= n_terms:
            raise ShapeError("groups must give every term a group index below the number of terms")
        self.rounds = int(math.log2(width))

    @property
    def n_outputs(self) -> int:
        return len(self.base)

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """The plaintext reference on inputs X (n, n_inputs)."""
        X = np.asarray(X, dtype=np.float64)
        lit = np.ones((len(X), len(self.literals) + 1))  # the last column is the constant 1 (index -1)
        for k, (const, terms) in enumerate(self.literals):
            lit[:, k] = const + sum(w * X[:, i] for i, w in terms)
        prod = np.prod(lit[:, self.factors], axis=2)  # index -1 is the column of ones
        out = np.tile(self.base, (len(X), 1))
        np.add.at(out.T, self.outputs, (prod * self.values).T)
        return out

    def scaled(self, factor: float) -> ProductSum:
        """The same product sum with every value and the base multiplied by `factor`."""
        return ProductSum(self.n_inputs, self.literals, self.factors, self.values * factor, self.outputs,
                          self.base * factor, self.groups)

    def output_bound(self) -> float:
        """Largest |f_c| on 0/1 literals: |base_c| plus, per group, its largest |v_t|. A group is
        the compiler's statement that at most one of its terms is non-zero on any valid input (the
        leaves of one tree); by default every term is its own group, a bound that always holds."""
        total = np.abs(self.base).copy()
        peak: dict[tuple[int, int], float] = {}
        for g, c, v in zip(self.groups, self.outputs, np.abs(self.values), strict=True):
            peak[(int(g), int(c))] = max(peak.get((int(g), int(c)), 0.0), float(v))
        for (_, c), v in peak.items():
            total[c] += v
        return float(total.max())

    def lower(self) -> Program:
        """The batch-layout program (module docstring): pairing Linears with weights +-1 and the
        products p_r, identical pairs computed once, then values and base."""
        paths = [list(row) for row in self.factors]
        ops: list = []
        unit, prev_width = 1.0, self.n_inputs
        for r in range(self.rounds):
            pair_ids: dict[tuple[int, int], int] = {}
            for i, path in enumerate(paths):
                nxt = []
                for a, b in zip(path[0::2], path[1::2], strict=True):
                    key = (max(a, b), min(a, b))
                    nxt.append(-1 if key == (-1, -1) else pair_ids.setdefault(key, len(pair_ids)))
                paths[i] = nxt
            if len(pair_ids) > MAX_DIM or len(pair_ids) * prev_width > MAX_DENSE:
                raise ShapeError(f"{len(pair_ids)} products in one layer is more than the batch layout holds: "
                                 "use fewer or shallower trees")
            W, b = np.zeros((len(pair_ids), prev_width)), np.zeros(len(pair_ids))
            for (x1, x2), j in pair_ids.items():
                for x in (x1, x2):
                    if x < 0:
                        b[j] += unit
                    elif r == 0:  # the literals are sparse: never a dense (literals x inputs) matrix
                        const, terms = self.literals[x]
                        b[j] += const
                        for i, w in terms:
                            W[j, i] += w
                    else:
                        W[j, x] += 1.0
            ops += [Linear(W, b), Poly((0.0, -unit, 1.0))]
            unit, prev_width = 2.0 * unit * unit, len(pair_ids)
        if self.n_outputs * prev_width > MAX_DENSE:
            raise ShapeError(f"{self.n_outputs} outputs of {prev_width} products is more than the batch layout holds")
        W_out = np.zeros((self.n_outputs, prev_width))
        np.add.at(W_out, (self.outputs, [p[0] for p in paths]), self.values / unit)
        ops.append(Linear(W_out, self.base))
        return Program(self.n_inputs, ops)

    def to_dict(self) -> dict:
        return {"n_inputs": self.n_inputs, "literals": [[c, [list(t) for t in terms]] for c, terms in self.literals],
                "factors": self.factors.tolist(), "values": self.values.tolist(),
                "outputs": self.outputs.tolist(), "base": self.base.tolist(), "groups": self.groups.tolist()}

    @classmethod
    def from_dict(cls, d: object) -> ProductSum:
        """Parse untrusted JSON; anything malformed is a `WireFormatError` or `ShapeError`."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list)
                                              for k in ("literals", "factors", "values", "outputs", "base")):
            raise WireFormatError("a product sum is an object with literals, factors, values, outputs and base")
        literals = []
        for raw in d["literals"][:MAX_DIM + 1]:
            if not (isinstance(raw, list) and len(raw) == 2 and _number(raw[0]) and isinstance(raw[1], list)
                    and all(isinstance(t, list) and len(t) == 2 and _index(t[0]) and _number(t[1])
                            for t in raw[1][:MAX_LITERAL_TERMS + 1])):
                raise WireFormatError("a literal is [constant, [[input index, weight], ...]]")
            literals.append((raw[0], tuple((t[0], t[1]) for t in raw[1])))
        if len(literals) > MAX_DIM:
            raise ShapeError(f"at most {MAX_DIM} literals")
        factors = d["factors"]
        if len(factors) > MAX_DIM or not all(isinstance(r, list) and len(r) <= MAX_FACTORS
                                             and all(_index(v, -1) for v in r) for r in factors):
            raise WireFormatError("factors must be rows of integer literal indices")
        groups = d.get("groups", list(range(len(d["values"]))))
        if not isinstance(groups, list):
            raise WireFormatError("groups must be a list")
        for key, seq in (("values", d["values"]), ("outputs", d["outputs"]), ("base", d["base"]), ("groups", groups)):
            if len(seq) > MAX_DIM:
                raise ShapeError(f"at most {MAX_DIM} {key}")
        if not all(_number(v) for v in d["values"] + d["base"]) or not all(_index(v) for v in d["outputs"] + groups):
            raise WireFormatError("values and base must be numbers, outputs and groups integer indices")
        widths = {len(r) for r in factors}
        if not factors:
            raise ShapeError("a product sum needs at least one term")
        if len(widths) > 1:
            raise ShapeError("every term must have the same number of factors")
        return cls(d.get("n_inputs"), literals, np.asarray(factors, dtype=np.int64).reshape(len(factors), -1),
                   np.asarray(d["values"], dtype=np.float64), np.asarray(d["outputs"], dtype=np.int64),
                   np.asarray(d["base"], dtype=np.float64), np.asarray(groups, dtype=np.int64))


def _number(v: object) -> bool:
    # a JSON integer may be too large for a float (math.isfinite would raise OverflowError)
    return (isinstance(v, float) and math.isfinite(v)) or (isinstance(v, int) and not isinstance(v, bool)
                                                         and abs(v) < 2 ** 1023)


def _index(v: object, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < MAX_DIM
