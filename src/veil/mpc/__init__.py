"""Secure multi-party computation: encrypted training and inference of PyTorch models.

Threat model (as seeds 002 and 004): 2 or more semi-honest computing parties and a dealer
(crypto provider) that supplies correlated randomness, never receives inputs or shares, and
does not collude with the parties. Values are additively shared over Z_2^64 in fixed point
(``frac_bits``, default 16); all randomness is AES-CTR keyed from ``os.urandom``.

Layers: `comm` (in-process threads, or gloo over TCP with byte/round counters and timeouts),
`provider` (the dealer: seed-expanded Beaver triples, truncation pairs, comparison masks; only
the last party receives correcting shares), `primitives` (opening, Beaver products, truncation,
exact comparison by a bit-packed carry tree, ReLU, max/argmax), `approx` (exp, log, reciprocal,
sqrt, sigmoid, softmax with documented and tested error bounds), `tensor` (`MPCTensor`, a
``__torch_dispatch__`` wrapper so that torch.nn modules, losses, autograd and torch.optim run
unchanged), `nn` (sharing models and rows/columns, per-party save/load), `data` (digits, IDX).

Error bounds: products and truncation are exact up to 1 unit in the last place (2^-16) plus
the encoding error of the inputs, except with probability about |x| * 2^-63 per truncated
element (x the raw product: about 2^-31 for two factors of magnitude 1); comparisons are exact.

Known limits: Adam runs (all its ops are implemented) but is not accurate at 16 fractional
bits because second-moment estimates underflow; BatchNorm is supported in eval mode (forward
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
