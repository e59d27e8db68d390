"""Sums of products of 0/1 literals, and their single-sample layout (tree ensembles compile here).

Split as the leveled kind is: `ir` (the `ProductSum` form), `packing` (the row layout's slot
geometry and packing), `planner` (parameters and plan checks), `backend` (the row-layout
evaluation and the server and client of the `product-sum` circuit kind).

A `ProductSum` computes, per output c,

    f_c(x) = base_c + sum over terms t of output c of  v_t * prod_{j < 2^R} lambda_{t,j}(x)

where every literal lambda(x) = const + sum_i w_i x_i is affine in the inputs and takes the values
0 and 1 on the inputs clients send (encoded bits, `veil.program.encoding`), and a missing factor
is the constant 1. A tree ensemble is this form: a term per leaf, a literal per feature interval
on its path, v_t the leaf value. The form is model-agnostic; `ml/` builds it and the backends below
run it without knowing what produced it.

Batch layout (`lower`, run by the leveled backend): R rounds of `Linear` (pair two factors,
s = a + b, weights +-1: exact, no level) then `Poly` p_r(s) = s^2 - c_r s, which on s in
{0, c_r, 2 c_r} gives {0, 0, 2 c_r^2}: the product of two bits times the next unit
c_{r+1} = 2 c_r^2 (c_0 = 1); identical pairs are computed once. A last Linear takes the values and
the base. Levels: R + 1.

Row layout (`SlotCircuit`: one sample per ciphertext, for latency). Protocol, per request:
1. the client encrypts its encoded bits once, repeated with period P = next_pow2(n_inputs)
   through the slots (x[j] = bits[j mod P]);
2. selection (1 level): term t's factor pair p (of 2^(R-1)) is given the slot p*H + l_t, with term
   slots l_t = c + K*m (K = next_pow2(n_outputs), m-th term of output c) and H = next_pow2(max l_t
   + 1); y = sum_k diag_k * rot(x, k) + bias computes every pair sum a + b at its slot, as a
   baby-step giant-step diagonal method whose baby steps are successive rotations by 1 and whose
   giant steps are a Horner sum of rotations by B (two Galois keys instead of B + P/B); then the
   square p_1 (1 level);
3. rounds r = 2 .. R (1 level each): y + rot(y, 2^(R-r) H) adds each pair to its partner (exact),
   then p_r; slot l_t now holds c_R times term t's product;
4. output (1 level): times the plaintext of v_t / c_R at slot l_t (zero elsewhere), rescale, then
   rotate-and-sum by K, 2K, ..., slots/2, and the base: every slot congruent to c mod K holds
   f_c(x), the whole sum and nothing partial, so decryption shows the outputs and no term.
Levels: R + 2. Galois keys: 1, B, the R - 1 partner offsets and log2(slots / K) sum steps.
Rotations per sample: (B - 1) + (P/B - 1) + (R - 1) + log2(slots / K)."""

from veil.program.products.backend import (
    KIND,
    ProductSumCircuit,
    ProductSumClient,
    SlotCircuit,
    compile_product_sum,
    output_shift,
)
from veil.program.products.ir import MAX_DENSE, MAX_FACTORS, MAX_LITERAL_TERMS, Literal, ProductSum
from veil.program.products.packing import MAX_ROW_WORDS, SlotGeometry, SlotLayout
from veil.program.products.planner import plan_product_sum

__all__ = ["KIND", "MAX_DENSE", "MAX_FACTORS", "MAX_LITERAL_TERMS", "MAX_ROW_WORDS", "Literal", "ProductSum",
           "ProductSumCircuit", "ProductSumClient", "SlotCircuit", "SlotGeometry", "SlotLayout",
           "compile_product_sum", "output_shift", "plan_product_sum"]
