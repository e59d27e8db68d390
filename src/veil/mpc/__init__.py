"""Secure multi-party computation: encrypted training and inference of PyTorch models.

Threat model: 2 or more semi-honest computing parties and a dealer (crypto provider) that
supplies correlated randomness, never receives inputs or shares, and does not collude with the
parties; a network attacker who can read, inject and connect to anything
between the processes. Values are additively shared over Z_2^64 in fixed point (``frac_bits``,
default 16). All randomness is AES-256-CTR keyed from ``os.urandom``; every stream of a key has
its own 64-bit stream id and a block counter starting at zero, so no two streams (e.g. the masks
of two dealer requests) share a keystream block (`ring.PRG`).

What each sees: a computing party sees its own inputs, its shares, and values opened during
protocols, each masked by fresh dealer randomness (uniform and independent of the secrets,
across the whole run: tests/mpc/test_view.py); it learns a result only when it is named in
``reveal(to=...)``. The dealer sees the shapes and kinds of the requested randomness (request
headers) and nothing else. The network sees TLS 1.3 records only: every link between processes
is mutually authenticated with certificates that name the peer's role and rank
(`transport.TLSComm`, `certs`); a process without a certificate for the rank it claims is
refused. Not covered: malicious (deviating) parties, a dealer colluding with a party, traffic
analysis (message sizes and timing follow the public model shapes).

Layers: `comm` (the communicator interface with byte/round counters and timeouts, and its in-
process twin), `transport` (the distributed twin: TLS 1.3 links between processes), `certs` (CA
and per-rank certificates), `provider` (the dealer: seed-expanded Beaver triples, truncation and
division pairs, comparison masks; only the last party receives correcting shares), `primitives`
(a party's `Runtime`: its communicator, dealer client and precision; opening, Beaver products,
exact division by public integers, exact comparison by a bit-packed carry tree, ReLU,
max/argmax), `launcher` (starting the parties: threads with `run_local`, one process per rank
with `launch`), `checks` (the opt-in range-check mode), `approx` (exp, log,
reciprocal, sqrt, sigmoid, softmax with documented and tested error bounds), `tensor`
(`MPCTensor`, a ``__torch_dispatch__`` wrapper so that torch.nn modules, losses, autograd and
torch.optim run unchanged; views alias their base) and
`_ops` (the rules per aten op, one module per op family, in a table), `nn` (sharing models and
rows/columns, per-party save/load), `sharefile` (offline share files for data owners outside
the parties, results encrypted to a holder) and `idx` (MNIST IDX files). Experiment models and
the digits loader of the benchmarks live in ``benchmarks/mpc_models.py``.

Error bounds and ranges (frac_bits f = 16): every value must stay within |v| < 2^(62 - f) = 2^46.
Truncation after products and division by a public integer d (means, loss reductions, average
pooling) are exact up to 1 unit in the last place (2^-16), with no failure probability, for every
raw value in `primitives.division_range` (about |x| < 2^62); so products (elementwise, matrix,
convolution) are exact up to that unit plus the encoding error of the inputs while each output
element's exact value satisfies |x y| < 2^(62 - 2f) = 2^30, and squares while |x| < 2^15.
Comparisons are exact on the whole ring. Beyond these ranges the ring wraps around: the
range-check mode (`checks`, ``with veil.mpc.range_checks():``) makes that a `RangeError`, at the
cost of one bit opened per check point (see there for what it checks and reveals).

Optimizers: torch.optim.SGD (with momentum) and torch.optim.Adam / AdamW run unchanged (default
foreach/fused=None: torch takes the single-tensor path for tensor subclasses). For Adam, the
rules of `_ops.adam_ops` keep both moment estimates bias-corrected with 2*frac_bits fractional
bits (the public factor 1 - beta^t is tracked apart), and 1/sqrt(v) comes from a range-reduced
approximation over every such value, [2^-32, 2^30) (`approx.inv_sqrt_wide`), so v ~ g^2 no
longer underflows; tests/mpc/test_adam.py matches plaintext Adam on digits (loss, weights,
accuracy within 3 points).

Known limits: Adam is scale invariant, so gradient entries at the fixed-point resolution (|g| of
a few 2^-16) still move their weight by about lr in a direction set by rounding (plaintext moves
them by lr too, in the true direction, or not at all if g = 0 exactly); amsgrad (needs max),
foreach=True, fused, capturable and differentiable are not supported; eps must be <= about
1.5e-3 (larger raises); sqrt(v) is accurate (1%) for every v, 1/sqrt(v) to 1% + 2^-16 sqrt(v)
relative, and g^2 must not wrap (|g| < 2^15); an Adam step costs 8 comparisons and an inverse
square root per parameter (MLP 784-128-64-10, two parties: ~110 MB sent per party and 107 MB
from the dealer, 476 rounds, against 3-4 MB and 44 rounds for SGD). Convolutions need
dilation=1; max-pooling without padding.
"""

from veil.mpc.checks import check_ranges, range_checks
from veil.mpc.errors import AccessError, MPCError, MPCTimeoutError, PartyFailureError, ProtocolError, RangeError
from veil.mpc.launcher import launch, run_local
from veil.mpc.primitives import Runtime, current
from veil.mpc.tensor import MPCTensor, argmax_onehot, from_public, share

__all__ = [
    "AccessError",
    "MPCError",
    "MPCTensor",
    "MPCTimeoutError",
    "PartyFailureError",
    "ProtocolError",
    "RangeError",
    "Runtime",
    "argmax_onehot",
    "check_ranges",
    "current",
    "from_public",
    "launch",
    "range_checks",
    "run_local",
    "share",
]
