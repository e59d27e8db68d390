"""TenSEAL 0.3.18 running the encrypted inference of its tutorial 4 ("Encrypted Convolution on
MNIST") on weights and images given in an .npz, timed per image as a client and a server would run
it; prints (and with --out writes) JSON. `benchmarks/he_nn.py --mnist-row` calls it with the weights
of the network veil runs, so both are measured on the same weights, images and machine in one run.

The code path is the tutorial's (written here from its description, not copied):
- parameters: CKKS, N=8192, coefficient moduli [31, 26 x 6, 31] bits, global scale 2^26, Galois keys
  for every power-of-two rotation (`generate_galois_keys()`) and relinearization keys;
- client: `ts.im2col_encoding(context, image, kh, kw, stride)`: the image's convolution windows
  laid out in one ciphertext (one row per kernel tap, one slot per window), then serialization;
- server (public context: no secret key): per output channel `conv2d_im2col(kernel, windows) +
  bias` (one plaintext product, then rotations and sums over the taps), `CKKSVector.pack_vectors`
  of the channels, `square_()`, `mm(fc1^T) + b1` (TenSEAL's diagonal vector-matrix product),
  `square_()`, `mm(fc2^T) + b2`, serialization;
- client: deserialization and `decrypt()`.

Per image the JSON holds the end-to-end seconds (encrypt + serialize, server deserialize + evaluate
+ serialize, client deserialize + decrypt, all in this one process, no network), the phases, the
bytes each way, the decrypted outputs and their argmax. The keys are made and the public context
serialized once before the timed images (as a client registers keys once); their size and time are
reported apart. `--warmup` images run first, untimed.

Input .npz: `conv_weight` (C, 1, kh, kw), `conv_bias` (C,), `stride` (scalar), `fc1_weight`
(H, C * windows), `fc1_bias` (H,), `fc2_weight` (K, H), `fc2_bias` (K,) as torch stores them, and
`images` (n, 28, 28) or (n, 1, 28, 28) in the network's input scale.

Usage: python tenseal_tutorial4.py --data weights_images.npz [--warmup 1] [--out result.json]
Runs in the venv of setup_tenseal.sh (tenseal and numpy only; it does not import veil or torch).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
SCALE_BITS = 26
COEFF_MOD_BIT_SIZES = [31, *([SCALE_BITS] * 6), 31]


def make_context() -> ts.Context:
    """The tutorial's CKKS context, with its secret key, Galois and relinearization keys."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=COEFF_MOD_BIT_SIZES)
    ctx.global_scale = 2.0**SCALE_BITS
    ctx.generate_galois_keys()
    return ctx


class Network:
    """The tutorial-4 network's plaintext weights in the form TenSEAL's calls take (Python lists,
    dense-layer matrices transposed), converted once before any image is timed."""

    def __init__(self, data: Any) -> None:
        conv = np.asarray(data["conv_weight"], dtype=np.float64)
        if conv.ndim != 4 or conv.shape[1] != 1:
            raise SystemExit(f"conv_weight must be (channels, 1, kh, kw), got {conv.shape}")
        self.kernel_shape = (int(conv.shape[2]), int(conv.shape[3]))
        self.stride = int(np.asarray(data["stride"]).reshape(-1)[0])
        self.kernels = [k[0].tolist() for k in conv]
        self.conv_bias = [float(b) for b in np.asarray(data["conv_bias"], dtype=np.float64).reshape(-1)]
        fc1 = np.asarray(data["fc1_weight"], dtype=np.float64)
        fc2 = np.asarray(data["fc2_weight"], dtype=np.float64)
        if fc2.shape[1] != fc1.shape[0] or len(self.conv_bias) != len(self.kernels):
            raise SystemExit(f"inconsistent shapes: fc1 {fc1.shape}, fc2 {fc2.shape}, conv {conv.shape}")
        self.fc1, self.fc2 = fc1.T.tolist(), fc2.T.tolist()
        self.fc1_bias = np.asarray(data["fc1_bias"], dtype=np.float64).tolist()
        self.fc2_bias = np.asarray(data["fc2_bias"], dtype=np.float64).tolist()

    def encrypt(self, ctx: ts.Context, image: np.ndarray) -> tuple[bytes, int]:
        """Client: the im2col encoding of one image, encrypted and serialized, and the number of
        windows (public geometry, sent beside the ciphertext)."""
        enc, windows = ts.im2col_encoding(ctx, image.tolist(), self.kernel_shape[0], self.kernel_shape[1],
                                          self.stride)
        return enc.serialize(), int(windows)

    def evaluate(self, ctx: ts.Context, request: bytes, windows: int) -> bytes:
        """Server: the tutorial's forward pass on one encrypted image under the public context."""
        x = ts.ckks_vector_from(ctx, request)
        channels = [x.conv2d_im2col(kernel, windows) + bias for kernel, bias in zip(self.kernels, self.conv_bias,
                                                                                       strict=True)]
        x = ts.CKKSVector.pack_vectors(channels)
        x.square_()
        x = x.mm(self.fc1) + self.fc1_bias
        x.square_()
        x = x.mm(self.fc2) + self.fc2_bias
        return x.serialize()


def run(data_path: Path, warmup: int) -> dict[str, Any]:
    data = np.load(data_path)
    net = Network(data)
    images = np.asarray(data["images"], dtype=np.float64)
    images = images.reshape(len(images), images.shape[-2], images.shape[-1])
    if len(images) == 0:
        raise SystemExit("no images in the .npz")
    t = time.perf_counter()
    client = make_context()
    public = client.copy()
    public.make_context_public()
    public_bytes = public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                    save_relin_keys=True)
    keygen_s = time.perf_counter() - t
    server = ts.context_from(public_bytes)
    for image in images[:warmup]:
        request, windows = net.encrypt(client, image)
        ts.ckks_vector_from(client, net.evaluate(server, request, windows)).decrypt()
    per_image, phases, up, down, outputs = [], {"encrypt_serialize_s": [], "server_s": [], "decrypt_s": []}, [], [], []
    for image in images:
        t0 = time.perf_counter()
        request, windows = net.encrypt(client, image)
        t1 = time.perf_counter()
        response = net.evaluate(server, request, windows)
        t2 = time.perf_counter()
        out = ts.ckks_vector_from(client, response).decrypt()
        t3 = time.perf_counter()
        per_image.append(t3 - t0)
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[key].append(value)
        up.append(len(request))
        down.append(len(response))
        outputs.append([float(v) for v in out])
    return {"tenseal": importlib.metadata.version("tenseal"), "numpy": np.__version__,
            "params": {"poly_modulus_degree": POLY_MODULUS_DEGREE, "coeff_mod_bit_sizes": COEFF_MOD_BIT_SIZES,
                       "scale_bits": SCALE_BITS, "galois_keys": "all (generate_galois_keys)"},
            "keygen_s": keygen_s, "public_context_bytes": len(public_bytes), "warmup": warmup,
            "n": len(images), "per_image_s": per_image, "median_s": statistics.median(per_image),
            "min_s": min(per_image), "phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
            "bytes_up": up, "bytes_down": down, "outputs": outputs,
            "predictions": [int(np.argmax(o)) for o in outputs], "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help=".npz of weights and images (see the docstring)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images run first")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = json.dumps(run(args.data, max(0, args.warmup)))
    if args.out is not None:
        args.out.write_text(result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
