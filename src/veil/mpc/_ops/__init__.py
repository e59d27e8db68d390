"""Rules that run aten ops on `MPCTensor` shares, one module per op family (as DTensor's
``_ops/``).

`veil.mpc.tensor` imports every family once `MPCTensor` exists, which registers its rules in
`registry.HANDLERS`; `MPCTensor.__torch_dispatch__` looks rules up there. Families: `view_ops`
(views, copies, indexing, creation), `pointwise_ops` (arithmetic, ReLU, sigmoid),
`activation_ops` (LeakyReLU, Hardtanh, abs, tanh, SiLU, GELU, Softplus, ELU, BCEWithLogitsLoss),
`reduction_ops` (sum, mean, max), `matrix_ops` (matmul, convolution), `pool_ops`, `loss_ops`
(losses and softmax), `norm_ops` (batch norm, dropout) and `adam_ops` (extended-precision
optimizer state, predicated rules over the pointwise ones).
"""
