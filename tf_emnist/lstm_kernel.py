"""A faster LSTM training pass for CPUs, in bfloat16 where its matmuls are fast.

Under XLA, every matmul of the LSTM runs in float32: XLA's CPU back end has no faster
bfloat16 dot. TensorFlow's own MatMul runs bfloat16 through oneDNN at 1.5-1.9x its float32
rate on an AMD EPYC with AVX512-BF16 (`python benchmarks/cpu_ceiling.py`), but at 0.4-0.8x
on an Intel Xeon with AVX512-BF16 and no AMX: whether it pays is measured, once a process
(`bf16_matmul_pays`). This kernel splits the training pass between the two:

- the two recurrences (the forward pass over the 28 steps and its backward pass) are
  compiled by XLA, in float32, each run as two launches over the two halves of the batch,
  side by side (`BATCH_HALVES`);
- the four large matmuls run outside XLA, each over all 28 steps at once (as cuDNN and
  oneDNN do), so each is one matmul with 28 x batch rows, not 28 small ones: the forward
  pass's input projection, and in the backward pass the input kernel's and the recurrent
  kernel's gradients and the gradient sent to the layer below. They run in bfloat16 with
  float32 accumulation where that measures faster (`matmul_dtype`), else in float32.

In bfloat16, the training pass's input projection is rounded to bfloat16's 8-bit mantissa
(its operands and its result), as mixed precision would round it, and so are the
gradients. Inference is Keras's own LSTM, in float32: the model evaluated and exported is a
plain keras.layers.LSTM with the same weights, and training saves a plain Keras copy
(`tf_emnist.model.keras_lstm_copy`). In float32 the kernel computes Keras's forward pass
and autodiff's gradients.
"""
from __future__ import annotations

import functools
import math
import time


# bfloat16 over float32 for TensorFlow's MatMul near the probe's shape: 1.9x on an AMD EPYC with AVX512-BF16,
# 0.59-0.75x on an Intel Xeon (family 6, model 207) whose hypervisor shows AVX512-BF16 but not AMX.
BF16_MIN_SPEEDUP = 1.3
# Run each recurrence as two half-batch XLA launches, which TensorFlow's executor runs side by
# side. On 2 cores TensorFlow's threads scale poorly over one small matmul (a step's 256 x 256 x
# 1,024: 1.25-1.4x one thread, where MKL's threads reach 1.9x): halves trained the float32 kernel
# at 1.21x (digit-letter) and 1.05x (merged) one launch on an Intel Xeon (benchmarks/kernel_float32.py).
BATCH_HALVES = True


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def bf16_matmul_speedup(rows: int = 7168, inner: int = 256, cols: int = 1024, rounds: int = 3) -> float:
    """TensorFlow's MatMul in bfloat16 over float32, the best of `rounds` alternating, at a kernel shape.

    The default shape is merged's forward input projection: 28 steps x 256 images by 256 by
    4 x 256 gates. It takes about a quarter of a second, once a process.
    """
    import tensorflow as tf

    a = tf.random.stateless_normal([rows, inner], seed=[0, 1])
    b = tf.random.stateless_normal([inner, cols], seed=[0, 2])
    operands = {dtype: (tf.cast(a, dtype), tf.cast(b, dtype)) for dtype in ("float32", "bfloat16")}
    best = dict.fromkeys(operands, math.inf)
    for round_ in range(rounds + 1):  # round 0 warms oneDNN up, untimed
        for dtype, (x, y) in operands.items():
            start = time.perf_counter()
            tf.matmul(x, y)  # eager on the CPU: returns once computed
            if round_:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best["float32"] / best["bfloat16"]


def bf16_matmul_pays() -> bool:
    """Whether the kernel's matmuls run faster in bfloat16 here: bfloat16 units, measured at least 1.3x float32."""
    return cpu_has_bf16_matmul() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


@functools.cache
def lstm_function(matmul_dtype: str = "bfloat16", projection_dtype: str | None = None, halves: bool = True):
    """The custom-gradient LSTM (x, h0, c0, kernel, recurrent_kernel, bias) -> (h of every step, last c).

    `matmul_dtype` is the four large matmuls' ("float32" gives Keras's forward pass and autodiff's gradients);
    `projection_dtype`, when given, overrides it for the forward input projection (benchmarks/kernel_projection.py);
    `halves` runs each recurrence as two independent launches over the two halves of the batch.
    """
    import tensorflow as tf

    def gates(z):
        i, f, g, o = tf.split(z, 4, axis=-1)  # Keras's order: input, forget, cell, output
        return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)

    @tf.function(jit_compile=True)
    def forward(projected, h, c, recurrent_kernel):
        """projected [T, B, 4H] = x_t W + b for every step -> h and c of every step, and the gates."""
        steps = projected.shape[0]
        hs, cs, gs = (tf.TensorArray(tf.float32, steps) for _ in range(3))
        for t in tf.range(steps):
            i, f, g, o = gates(projected[t] + tf.matmul(h, recurrent_kernel))
            c = f * c + i * g
            h = o * tf.tanh(c)
            hs, cs, gs = hs.write(t, h), cs.write(t, c), gs.write(t, tf.concat([i, f, g, o], -1))
        return hs.stack(), cs.stack(), gs.stack()

    @tf.function(jit_compile=True)
    def backward(d_hs, d_c_last, cs, gs, c0, recurrent_kernel):
        """Gradients of the gate pre-activations z of every step [T, B, 4H], and of h0 and c0."""
        steps = cs.shape[0]
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        d_zs = tf.TensorArray(tf.float32, steps)
        d_h, d_c = tf.zeros_like(c0), d_c_last
        for k in tf.range(steps):
            t = steps - 1 - k
            i, f, g, o = tf.split(gs[t], 4, axis=-1)
            tanh_c = tf.tanh(cs[t])
            d_h += d_hs[t]
            d_c += d_h * o * (1 - tanh_c * tanh_c)
            d_z = tf.concat([d_c * g * i * (1 - i), d_c * c_prev[t] * f * (1 - f),
                             d_c * i * (1 - g * g), d_h * tanh_c * o * (1 - o)], -1)
            d_zs = d_zs.write(t, d_z)
            d_h = tf.matmul(d_z, recurrent_kernel, transpose_b=True)
            d_c *= f
        return d_zs.stack(), d_h, d_c

    def matmul(a, b, dtype=matmul_dtype, **transpose):
        return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **transpose), tf.float32)

    @tf.custom_gradient
    def lstm(x, h0, c0, kernel, recurrent_kernel, bias):
        """x [T, B, D] (time-major) -> (h of every step [T, B, H], c of the last step)."""
        steps, batch, width = x.shape[0], tf.shape(x)[1], x.shape[2]
        rows = tf.reshape(x, (-1, width))
        projected = tf.reshape(matmul(rows, kernel, projection_dtype or matmul_dtype) + bias, (steps, batch, -1))
        parts = [slice(None, batch // 2), slice(batch // 2, None)] if halves else [slice(None)]
        # The custom gradient below replaces autodiff: keep the tape out of the XLA call.
        projected, h0_, c0_, w = map(tf.stop_gradient, (projected, h0, c0, recurrent_kernel))
        forwards = [forward(projected[:, part], h0_[part], c0_[part], w) for part in parts]
        hs = tf.concat([hs for hs, _, _ in forwards], 1)
        c_last = tf.concat([cs[-1] for _, cs, _ in forwards], 0)

        def grad(d_hs, d_c_last):
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            backwards = [backward(d_hs[:, part], d_c_last[part], cs, gs, c0[part], recurrent_kernel)
                         for part, (_, cs, gs) in zip(parts, forwards)]
            d_zs, d_h0, d_c0 = (tf.concat(parts_, axis) for parts_, axis in zip(zip(*backwards), (1, 0, 0)))
            d_z = tf.reshape(d_zs, (-1, d_zs.shape[-1]))
            h_prev = tf.reshape(tf.concat([h0[None], hs[:-1]], 0), (-1, hs.shape[-1]))
            d_x = tf.reshape(matmul(d_z, kernel, transpose_b=True), tf.shape(x))
            return (d_x, d_h0, d_c0, matmul(rows, d_z, transpose_a=True),
                    matmul(h_prev, d_z, transpose_a=True), tf.reduce_sum(d_z, 0))

        return (hs, c_last), grad

    return lstm


@functools.cache
def kernel_lstm_class():
    """keras.layers.LSTM, with the kernel above for training wherever it applies (float32, no mask, default activations)."""
    import keras
    import tensorflow as tf

    # Registered because Bidirectional makes its backward layer from this one's config.
    @keras.saving.register_keras_serializable(package="tf_emnist")
    class KernelLSTM(keras.layers.LSTM):
        """A keras.layers.LSTM that trains with the kernel above; its large matmuls in `matmul_dtype`."""

        def __init__(self, units, matmul_dtype="bfloat16", **kwargs):
            super().__init__(units, **kwargs)
            self.matmul_dtype = matmul_dtype

        def get_config(self):
            return {**super().get_config(), "matmul_dtype": self.matmul_dtype}

        def inner_loop(self, sequences, initial_state, mask, training=False):
            cell = self.cell
            plain = (cell.activation is keras.activations.tanh and cell.recurrent_activation is keras.activations.sigmoid
                     and cell.use_bias and not (cell.dropout or cell.recurrent_dropout) and self.compute_dtype == "float32")
            # Inference runs Keras's own loop: exports and validation see exactly a keras.layers.LSTM.
            if not training or mask is not None or not plain:
                return super().inner_loop(sequences, initial_state, mask, training)
            x = tf.transpose(sequences, (1, 0, 2))
            if self.go_backwards:
                x = tf.reverse(x, [0])
            lstm = lstm_function(self.matmul_dtype, halves=BATCH_HALVES)
            hs, c_last = lstm(x, *initial_state, cell.kernel.value, cell.recurrent_kernel.value, cell.bias.value)
            # Keras's layout: batch-major, in the order the steps were processed.
            return hs[-1], tf.transpose(hs, (1, 0, 2)), [hs[-1], c_last]

    return KernelLSTM

