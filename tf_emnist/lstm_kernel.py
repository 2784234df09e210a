"""A faster LSTM training pass for CPUs, in bfloat16 where its matmuls are fast.

Under XLA, every matmul of the LSTM runs in float32: XLA's CPU back end has no faster
bfloat16 dot. TensorFlow's own MatMul runs bfloat16 through oneDNN, faster than float32 on
some CPUs with bfloat16 units and slower on others (docs/performance.md): whether it pays is
measured, once a process (`bf16_matmul_pays`). This kernel splits the training pass between
the two:

- the two recurrences (the forward pass over the 28 steps and its backward pass) are
  compiled by XLA, in float32; each half of the batch runs as its own LSTM, and the two run
  side by side (`lstm_in_parts`);
- the four large matmuls run outside XLA, each over all 28 steps at once (as cuDNN and
  oneDNN do), so each is one matmul with 28 x batch rows, not 28 small ones: the forward
  pass's input projection, and in the backward pass the input kernel's and the recurrent
  kernel's gradients and the gradient sent to the layer below. They run in bfloat16 with
  float32 accumulation where that measures faster (`matmul_dtype`), else in float32.

In bfloat16, the training pass's input projection is rounded to bfloat16's 8-bit mantissa
(its operands and its result), as mixed precision would round it, and so are the
gradients. Inference is Keras's own LSTM, in float32: the model evaluated and exported is a
plain keras.layers.LSTM with the same weights, and training saves a plain Keras copy
(`tf_emnist.model.plain_copy`). In float32 the kernel computes Keras's forward pass
and autodiff's gradients, to float32 rounding (its sigmoid is computed through tanh).

TensorFlow only: `tf_emnist.backend` imports this module on the TensorFlow backend alone.
"""
from __future__ import annotations

import functools
import math
import time

import keras
import tensorflow as tf

# The bfloat16 speed-up over float32, at the probe's shape, below which the kernel's matmuls stay in
# float32: a smaller gain is lost again to the casts around each matmul.
BF16_MIN_SPEEDUP = 1.3


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


def _gates(z, units):
    """The four gates of z [B, 4H] in Keras's order (input, forget, cell, output), in one pass:
    sigmoid(x) = tanh(x / 2) / 2 + 1 / 2. Four separate activations over slices of z make
    XLA emit more loops, each slower."""
    scale = tf.repeat(tf.constant([0.5, 0.5, 1.0, 0.5]), units)
    return tf.tanh(z * scale) * scale + tf.repeat(tf.constant([0.5, 0.5, 0.0, 0.5]), units)


@tf.function(jit_compile=True)
def _forward(projected, h, c, recurrent_kernel):
    """projected [T, B, 4H] = x_t W + b for every step -> h and c of every step, and the gates."""
    steps, units = projected.shape[0], h.shape[-1]
    hs, cs, gs = (tf.TensorArray(tf.float32, steps) for _ in range(3))
    for t in tf.range(steps):
        a = _gates(projected[t] + tf.matmul(h, recurrent_kernel), units)
        i, f, g, o = tf.split(a, 4, axis=-1)
        c = f * c + i * g
        h = o * tf.tanh(c)
        hs, cs, gs = hs.write(t, h), cs.write(t, c), gs.write(t, a)
    return hs.stack(), cs.stack(), gs.stack()


@tf.function(jit_compile=True)
def _backward(d_hs, d_c_last, cs, gs, c0, recurrent_kernel):
    """Gradients of the gate pre-activations z of every step [T, B, 4H], and of h0 and c0."""
    steps = cs.shape[0]
    c_prev = tf.concat([c0[None], cs[:-1]], 0)
    d_zs = tf.TensorArray(tf.float32, steps)
    d_h, d_c = tf.zeros_like(c0), d_c_last

    def step_inputs(t):
        return gs[t], cs[t], c_prev[t], d_hs[t]

    # Each step's inputs are sliced one step ahead, into the loop's state: the element-wise
    # fusions then read plain buffers instead of slicing inside the loop.
    ahead = step_inputs(steps - 1)
    for k in tf.range(steps):
        t = steps - 1 - k
        (a, c_t, c_before, d_h_out), ahead = ahead, step_inputs(tf.maximum(t - 1, 0))
        i, f, g, o = tf.split(a, 4, axis=-1)
        tanh_c = tf.tanh(c_t)
        d_h += d_h_out
        d_c += d_h * o * (1 - tanh_c * tanh_c)
        d_z = tf.concat([d_c * g * i * (1 - i), d_c * c_before * f * (1 - f),
                         d_c * i * (1 - g * g), d_h * tanh_c * o * (1 - o)], -1)
        d_zs = d_zs.write(t, d_z)
        d_h = tf.matmul(d_z, recurrent_kernel, transpose_b=True)
        d_c *= f
    return d_zs.stack(), d_h, d_c


def _over_steps(a):
    """[T, B, n] -> [T * B, n]: the rows of a large matmul over all steps."""
    return tf.reshape(a, (-1, a.shape[-1]))


@functools.cache
def lstm_function(matmul_dtype: str = "bfloat16"):
    """The custom-gradient LSTM (x, h0, c0, kernel, recurrent_kernel, bias) -> (h of every step, last c).

    x is time-major [T, B, D]. `matmul_dtype` is the four large matmuls' ("float32" gives Keras's forward
    pass and autodiff's gradients, to float32 rounding). `lstm_in_parts` runs it over parts of a batch.
    """
    def matmul(a, b, **transpose):
        return tf.cast(tf.matmul(tf.cast(a, matmul_dtype), tf.cast(b, matmul_dtype), **transpose), tf.float32)

    @tf.custom_gradient
    def lstm(x, h0, c0, kernel, recurrent_kernel, bias):
        """x [T, B, D] (time-major) -> (h of every step [T, B, H], c of the last step)."""
        steps, batch = x.shape[0], tf.shape(x)[1]
        rows = _over_steps(x)
        projected = tf.reshape(matmul(rows, kernel) + bias, (steps, batch, -1))
        # The custom gradient below replaces autodiff: keep the tape out of the XLA call.
        hs, cs, gs = _forward(*map(tf.stop_gradient, (projected, h0, c0, recurrent_kernel)))

        def grad(d_hs, d_c_last):
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            d_zs, d_h0, d_c0 = _backward(d_hs, d_c_last, cs, gs, c0, recurrent_kernel)
            d_z = _over_steps(d_zs)
            d_x = tf.reshape(matmul(d_z, kernel, transpose_b=True), tf.shape(x))
            # The recurrent kernel's gradient pairs each step's d_z with the h before it: h0, then
            # hs[:-1]. Slices along the first axis share their buffers, where a concat would copy.
            d_recurrent = (matmul(_over_steps(hs[:-1]), _over_steps(d_zs[1:]), transpose_a=True)
                           + matmul(h0, d_zs[0], transpose_a=True))
            # A matmul by ones sums the rows faster than reduce_sum does here (oneDNN against a reduction).
            d_bias = tf.matmul(tf.ones((1, tf.shape(d_z)[0])), d_z)[0]
            return d_x, d_h0, d_c0, matmul(rows, d_z, transpose_a=True), d_recurrent, d_bias

        return (hs, cs[-1]), grad

    return lstm


def lstm_in_parts(sequences, h0, c0, kernel, recurrent_kernel, bias, matmul_dtype: str = "bfloat16",
                  halves: bool = True):
    """The kernel's LSTM over batch-major sequences [B, T, D] -> (last h, h of every step [B, T, H], last c).

    With `halves`, each half of the batch runs as its own LSTM (`lstm_function`), and TensorFlow's
    executor runs the two side by side: their XLA recurrences and their large matmuls. On few
    cores TensorFlow's threads scale poorly over one small matmul, so two halves keep the cores
    busier than one batch (docs/performance.md). Each half has its own input projection and
    large matmuls, so no batch-sized tensor is sliced or stitched inside the kernel, and
    autodiff adds up the two halves' weight gradients.
    """
    lstm = lstm_function(matmul_dtype)
    batch = tf.shape(sequences)[0]
    sizes = [batch // 2, batch - batch // 2] if halves else [batch]
    # tf.split, not slices: its gradient is one concat, where each slice's would be a zero-filled
    # batch-sized tensor, and autodiff would add them up.
    parts = zip(*(tf.split(a, sizes) for a in (sequences, h0, c0)))
    outputs = [lstm(tf.transpose(x, (1, 0, 2)), h0_, c0_, kernel, recurrent_kernel, bias) for x, h0_, c0_ in parts]
    hs = tf.concat([tf.transpose(part_hs, (1, 0, 2)) for part_hs, _ in outputs], 0)
    # The last h from the time-major outputs: a layer that returns only it leaves hs unused.
    last_h = tf.concat([part_hs[-1] for part_hs, _ in outputs], 0)
    return last_h, hs, tf.concat([c_last for _, c_last in outputs], 0)


# Registered because Bidirectional makes its backward layer from this one's config.
@keras.saving.register_keras_serializable(package="tf_emnist")
class KernelLSTM(keras.layers.LSTM):
    """keras.layers.LSTM, with the kernel above for training wherever it applies (float32, no mask, default
    activations); its large matmuls in `matmul_dtype`."""

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
        if self.go_backwards:
            sequences = tf.reverse(sequences, [1])
        last_h, hs, c_last = lstm_in_parts(sequences, *initial_state, cell.kernel.value,
                                           cell.recurrent_kernel.value, cell.bias.value, self.matmul_dtype)
        # Keras's layout: batch-major, in the order the steps were processed.
        return last_h, hs, [last_h, c_last]
