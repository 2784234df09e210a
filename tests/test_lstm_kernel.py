"""tf_emnist.lstm_kernel: the same LSTM as Keras's, autodiff's gradients in float32, and bfloat16 where it should be."""
import functools
import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_train import TINY, run_cli
from tf_emnist.config import TrainConfig
from tf_emnist.backend import kernel_matmul_dtype, use_lstm_kernel
from tf_emnist.lstm_kernel import KernelLSTM, bf16_matmul_pays, bf16_matmul_speedup, lstm_in_parts
from tf_emnist.model import build_model, compile_model, custom_objects

RNG = np.random.default_rng(0)
X = tf.constant(RNG.random((5, 28, 7), dtype=np.float32))


def outputs_and_gradients(model):
    """The model's training-mode output and the gradients of a loss that uses every output."""
    with tf.GradientTape() as tape:
        tape.watch(X)
        out = model(X, training=True)
        loss = tf.reduce_sum(tf.sin(3 * out))
    return out, tape.gradient(loss, [X, *model.trainable_variables])


def keras_and_ours(matmul_dtype="bfloat16", **options):
    """The same one-layer model (same weights) with keras.layers.LSTM and with the kernel's layer."""
    bidirectional = options.pop("bidirectional", False)
    models = []
    for layer_class in (keras.layers.LSTM, functools.partial(KernelLSTM, matmul_dtype=matmul_dtype)):
        layer = layer_class(6, **options)
        layer = keras.layers.Bidirectional(layer) if bidirectional else layer
        models.append(keras.Sequential([keras.Input((28, 7)), layer, keras.layers.Dense(3)]))
    models[1].set_weights(models[0].get_weights())
    return models


def largest_relative_error(expected, got):
    return max(float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(a))) for a, b in zip(expected, got))


@pytest.mark.parametrize("halves", [True, False])
def test_the_kernel_in_float32_gives_autodiffs_gradients(halves):
    """The kernel in float32 against the Keras LSTM it replaces, with a non-zero initial state.

    With `halves`, a batch of 5 runs as two LSTMs, over halves of 2 and 3."""
    keras_lstm = keras.layers.LSTM(6, return_sequences=True, return_state=True)
    h0, c0 = (tf.constant(RNG.normal(size=(5, 6)), tf.float32) for _ in range(2))
    keras_lstm(X, initial_state=[h0, c0])
    weights = [w.value for w in keras_lstm.weights]  # kernel, recurrent kernel, bias
    inputs = [X, h0, c0, *weights]

    def loss(hs, c_last):
        return tf.reduce_sum(tf.sin(3 * hs)) + tf.reduce_sum(tf.cos(c_last))

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        hs, _, c_last = keras_lstm(X, initial_state=[h0, c0])
        expected = loss(hs, c_last)
        _, ours_hs, ours_c = lstm_in_parts(X, h0, c0, *weights, "float32", halves=halves)
        ours = loss(ours_hs, ours_c)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert largest_relative_error(tape.gradient(expected, inputs), tape.gradient(ours, inputs)) < 1e-5


@pytest.mark.parametrize("options", [
    {"return_sequences": True}, {"return_sequences": False}, {"return_sequences": True, "go_backwards": True},
    {"return_sequences": False, "bidirectional": True},
])
def test_the_layer_is_kerass_lstm_with_bfloat16_gradients(options):
    keras_model, ours = keras_and_ours(**options)
    expected_out, expected_grads = outputs_and_gradients(keras_model)
    out, grads = outputs_and_gradients(ours)
    # The training pass's large matmuls (the input projection, three in the backward pass) are
    # rounded to bfloat16 (8-bit mantissa): close, not equal.
    assert 1e-6 < largest_relative_error([expected_out], [out]) < 1e-2
    assert 1e-5 < largest_relative_error(expected_grads, grads) < 3e-2
    # Inference is Keras's float32 LSTM.
    np.testing.assert_allclose(ours(X, training=False), keras_model(X, training=False), atol=1e-6)


def test_the_layer_in_float32_is_kerass_lstm_with_its_gradients():
    """`--lstm-kernel --no-bf16-gradients`; Bidirectional rebuilds its backward layer from the config."""
    keras_model, ours = keras_and_ours("float32", return_sequences=False, bidirectional=True)
    assert ours.layers[0].backward_layer.matmul_dtype == "float32"
    expected_out, expected_grads = outputs_and_gradients(keras_model)
    out, grads = outputs_and_gradients(ours)
    np.testing.assert_allclose(out, expected_out, atol=1e-6)
    assert largest_relative_error(expected_grads, grads) < 1e-5


def test_the_layer_falls_back_to_keras_where_the_kernel_does_not_apply():
    keras_model, ours = keras_and_ours(return_sequences=True, activation="relu")
    for expected, got in zip(outputs_and_gradients(keras_model)[1], outputs_and_gradients(ours)[1]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_the_kernel_is_the_cpu_default_its_matmuls_in_bfloat16_only_where_that_pays(monkeypatch):
    monkeypatch.setattr("tf_emnist.lstm_kernel.bf16_matmul_pays", lambda: True)
    assert use_lstm_kernel(TrainConfig()) and kernel_matmul_dtype(TrainConfig()) == "bfloat16"
    assert not use_lstm_kernel(TrainConfig(jit_compile=False))
    assert not use_lstm_kernel(TrainConfig(mixed_precision=True))
    assert not use_lstm_kernel(TrainConfig(lstm_kernel=False))  # Keras's LSTM, all in XLA
    config = TrainConfig(bf16_gradients=False)
    assert use_lstm_kernel(config) and kernel_matmul_dtype(config) == "float32"
    monkeypatch.setattr("tf_emnist.lstm_kernel.bf16_matmul_pays", lambda: False)
    assert use_lstm_kernel(TrainConfig()) and kernel_matmul_dtype(TrainConfig()) == "float32"
    assert not use_lstm_kernel(TrainConfig(jit_compile=False))
    assert use_lstm_kernel(TrainConfig(bf16_gradients=True, jit_compile=False))
    assert kernel_matmul_dtype(TrainConfig(bf16_gradients=True)) == "bfloat16"


def test_bfloat16_pays_only_with_bfloat16_units_and_a_measured_gain(monkeypatch):
    def no_probe():
        raise AssertionError("the probe ran on a CPU without bfloat16 units")

    monkeypatch.setattr("tf_emnist.lstm_kernel.cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr("tf_emnist.lstm_kernel.bf16_matmul_speedup", no_probe)
    assert not bf16_matmul_pays()
    monkeypatch.setattr("tf_emnist.lstm_kernel.cpu_has_bf16_matmul", lambda: True)
    for speedup, pays in ((0.75, False), (1.1, False), (1.9, True)):  # Intel Xeon without AMX; AMD EPYC
        monkeypatch.setattr("tf_emnist.lstm_kernel.bf16_matmul_speedup", lambda: speedup)
        assert bf16_matmul_pays() is pays


def test_the_probe_times_both_dtypes_and_remembers_its_answer(monkeypatch):
    calls = []
    real_matmul = tf.matmul
    monkeypatch.setattr(tf, "matmul", lambda a, b: calls.append(a.dtype) or real_matmul(a, b))
    speedup = bf16_matmul_speedup(64, 32, 128, rounds=2)
    assert 0 < speedup < 100
    assert calls.count(tf.float32) == calls.count(tf.bfloat16) == 3
    assert bf16_matmul_speedup(64, 32, 128, rounds=2) == speedup and len(calls) == 6


def test_bf16_gradients_without_the_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="bf16_gradients needs the LSTM kernel"):
        TrainConfig(lstm_kernel=False, bf16_gradients=True)


def test_the_model_compiles_outside_xla_and_builds_the_layer():
    config = TrainConfig(hidden_dim=8, num_layers=2, lstm_kernel=True, bf16_gradients=False, jit_compile=True)
    model = compile_model(build_model(config, 3), config)
    assert not model.jit_compile
    assert all(isinstance(layer, KernelLSTM) and layer.matmul_dtype == "float32" for layer in model.layers[:2])
    plain = TrainConfig(hidden_dim=8, num_layers=2, lstm_kernel=False, jit_compile=True)
    assert compile_model(build_model(plain, 3), plain).jit_compile


def test_a_live_model_with_the_kernel_saves_and_loads(tmp_path):
    model = build_model(TrainConfig(hidden_dim=8, num_layers=1, lstm_kernel=True, bf16_gradients=False), 3)
    model.save(tmp_path / "live.keras")
    loaded = keras.saving.load_model(tmp_path / "live.keras", custom_objects=custom_objects())
    assert loaded.layers[0].matmul_dtype == "float32"
    np.testing.assert_allclose(loaded(X[:, :, :1].numpy().repeat(28, -1)), model(X[:, :, :1].numpy().repeat(28, -1)))


def test_a_run_with_bf16_gradients_saves_a_plain_keras_model(nist_dir, tmp_path):
    run = tmp_path / "run"
    tiny = [a for a in TINY if a != "--no-jit-compile"]
    assert run_cli("train", "--data-dir", nist_dir, "--output", run, "--epochs", 1, "--bidirectional",
                   "--bf16-gradients", "--no-evaluate", *tiny) == 0
    with zipfile.ZipFile(run / "model.keras") as archive:
        saved = json.loads(archive.read("config.json"))
    assert "KernelLSTM" not in json.dumps(saved)
    assert '"class_name": "LSTM"' in json.dumps(saved)
    assert json.loads((run / "config.json").read_text())["bf16_gradients"] is True
