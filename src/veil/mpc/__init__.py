"""Secure multi-party computation: encrypted training and inference of PyTorch models.

Threat model (as seeds 002 and 004): 2 or more semi-honest computing parties and a dealer
(crypto provider) that supplies correlated randomness, never receives inputs or shares, and does
not collude with the parties; a network attacker who can read, inject and connect to anything
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
(opening, Beaver products, division by public integers, exact comparison by a bit-packed carry
tree, ReLU, max/argmax), `approx` (exp, log, reciprocal, sqrt, sigmoid, softmax with documented
and tested error bounds), `tensor` (`MPCTensor`, a ``__torch_dispatch__`` wrapper so that
torch.nn modules, losses, autograd and torch.optim run unchanged; views alias their base) and
`_ops` (the rules per aten op, one module per op family, in a table), `nn` (sharing models and
rows/columns, per-party save/load), `sharefile` (offline share files for data owners outside
the parties, results encrypted to a holder) and `idx` (MNIST IDX files). Experiment models and
the digits loader of the benchmarks live in ``benchmarks/mpc_models.py``.

Error bounds: products, truncation and division by a public integer d (means, loss reductions,
average pooling) are exact up to 1 unit in the last place (2^-16) plus the encoding error of the
inputs, except with probability about |x| * 2^-63 per element (x the raw value divided: about
2^-31 for a product of two factors of magnitude 1); comparisons are exact.

Optimizers: torch.optim.SGD (with momentum) and torch.optim.Adam / AdamW run unchanged (default
foreach/fused=None: torch takes the single-tensor path for tensor subclasses). For Adam, the
rules of `_ops.adam_ops` keep both moment estimates bias-corrected with 2*frac_bits fractional
bits (the public factor 1 - beta^t is tracked apart), and 1/sqrt(v) comes from a range-reduced
approximation over [2^-32, 32] (`approx.inv_sqrt_wide`), so v ~ g^2 no longer underflows;
tests/mpc/test_adam.py matches plaintext Adam on digits (loss, weights, accuracy within 3
points).

Known limits: Adam is scale invariant, so gradient entries at the fixed-point resolution (|g| of
a few 2^-16) still move their weight by about lr in a direction set by rounding (plaintext moves
them by lr too, in the true direction, or not at all if g = 0 exactly); amsgrad (needs max),
foreach=True, fused, capturable and differentiable are not supported; eps must be <= about
1.5e-3 (larger raises), sqrt(v) is accurate (1%) up to v = 32 (|g| <= about 5); each moment
update truncates values up to 2^40 |d|, d = g - m or g^2 - v, so its per-element wrap
probability is about 2^-23 |d| per step instead of 2^-31 for an ordinary product; an Adam step
costs 5 comparisons and an inverse square root per parameter (MLP 784-128-64-10: ~77 MB sent per
party, ~2.5 s in-process, against ~0 for SGD). BatchNorm is supported in eval mode (forward
only); convolutions need groups=1 and dilation=1; max-pooling without padding.
"""

from veil.mpc.errors import AccessError, MPCError, MPCTimeoutError, PartyFailureError, ProtocolError
from veil.mpc.primitives import Runtime, current
from veil.mpc.runtime import launch, run_local
from veil.mpc.tensor import MPCTensor, argmax_onehot, from_public, share

__all__ = [
    "AccessError",
    "MPCError",
    "MPCTensor",
    "MPCTimeoutError",
    "PartyFailureError",
    "ProtocolError",
    "Runtime",
    "argmax_onehot",
    "current",
    "from_public",
    "launch",
    "run_local",
    "share",
]
