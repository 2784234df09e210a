"""The model: shapes, parameter counts of both presets, the cuDNN-friendly layers, a train step."""
import keras
import numpy as np
import pytest

from tf_emnist.config import TrainConfig
from tf_emnist.callbacks import lever_callbacks
from tf_emnist.model import build_model, compile_model, expected_parameter_count, lstm_parameter_count
from tf_emnist.tasks import get_task


@pytest.mark.parametrize("task_name, params", [("digit-letter", 343_810), ("merged", 1_354_543)])
def test_presets_shapes_and_parameter_counts(task_name, params):
    task = get_task(task_name)
    model = build_model(task.preset, task.num_classes)
    assert model.input_shape == (None, 28, 28)
    assert model.output_shape == (None, task.num_classes)
    # Hand-counted: 4 gates x (in + hidden + 1) x hidden per layer, plus the Dense layer.
    assert model.count_params() == params == expected_parameter_count(task.preset, task.num_classes)
    lstms = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    assert [layer.units for layer in lstms] == [task.preset.hidden_dim] * 3
    assert [layer.return_sequences for layer in lstms] == [True, True, False]


def test_study_presets_match_the_study():
    dl, merged = get_task("digit-letter").preset, get_task("merged").preset
    assert (dl.num_layers, dl.hidden_dim, dl.epochs) == (3, 128, 8)
    assert (merged.num_layers, merged.hidden_dim, merged.epochs) == (3, 256, 7)
    for preset in (dl, merged):
        assert (preset.dropout, preset.learning_rate, preset.batch_size) == (0.2, 1e-3, 256)


def test_lstm_layers_stay_on_the_cudnn_path():
    model = build_model(get_task("merged").preset, 47)
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            assert layer.cell.activation.__name__ == "tanh"
            assert layer.cell.recurrent_activation.__name__ == "sigmoid"
            assert layer.cell.recurrent_dropout == 0 and not layer.unroll and layer.use_bias


def test_bidirectional_parameter_count():
    config = TrainConfig(hidden_dim=16, num_layers=2, bidirectional=True)
    model = build_model(config, 5)
    assert model.count_params() == expected_parameter_count(config, 5)
    assert model.count_params() == 2 * lstm_parameter_count(28, 16) + 2 * lstm_parameter_count(32, 16) + 32 * 5 + 5


@pytest.mark.parametrize("jit, lstm_kernel, bf16_gradients", [
    (False, None, None), (True, False, None), (True, True, False), (True, True, True),
])
def test_a_train_step_changes_the_weights_and_lowers_the_loss(jit, lstm_kernel, bf16_gradients):
    config = TrainConfig(hidden_dim=16, num_layers=2, learning_rate=1e-2, jit_compile=jit,
                         lstm_kernel=lstm_kernel, bf16_gradients=bf16_gradients)
    model = compile_model(build_model(config, 3), config, track_batch_loss=True)
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28), dtype=np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    before = [w.copy() for w in model.get_weights()]
    first = model.train_on_batch(x, y, return_dict=True)
    assert all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    for _ in range(20):
        last = model.train_on_batch(x, y, return_dict=True)
    assert last["batch_loss"] < first["batch_loss"]


@pytest.mark.parametrize("change", [
    dict(weight_decay=1e-4), dict(label_smoothing=0.1), dict(lr_schedule="cosine"), dict(clipnorm=1.0),
    dict(mixed_precision=True), dict(ema=0.9), dict(lr_schedule="plateau"), dict(bidirectional=True, augment=1.0),
])
def test_each_lever_compiles_and_trains(change):
    config = TrainConfig(hidden_dim=8, num_layers=1, epochs=2, jit_compile=False, **change)
    model = compile_model(build_model(config, 4), config, steps_per_epoch=3)
    x = np.random.default_rng(0).random((16, 28, 28), dtype=np.float32)
    logs = model.fit(x, np.arange(16) % 4, batch_size=8, epochs=1, verbose=0, validation_split=0.25,
                     callbacks=lever_callbacks(config)).history
    assert np.isfinite(logs["loss"][0])


@pytest.mark.parametrize("schedule", ["constant", "plateau", "cosine"])
def test_scale_lr_scales_the_rate_with_the_batch(schedule):
    from tf_emnist.model import peak_learning_rate

    config = TrainConfig(hidden_dim=8, num_layers=1, batch_size=1024, learning_rate=1e-3, scale_lr=True,
                         lr_schedule=schedule, jit_compile=False)
    assert peak_learning_rate(config) == pytest.approx(4e-3)  # the batch, across every device: 4 x 256
    assert peak_learning_rate(config.replace(batch_size=512)) == pytest.approx(2e-3)
    assert peak_learning_rate(config.replace(scale_lr=False)) == pytest.approx(1e-3)
    model = compile_model(build_model(config, 4), config, steps_per_epoch=2)
    x = np.random.default_rng(0).random((32, 28, 28), dtype=np.float32)  # 2 steps of 8, 16 to validate
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(float(model.optimizer.learning_rate)))
    model.fit(x, np.arange(32) % 4, batch_size=8, epochs=1, verbose=0, validation_split=0.5,
              callbacks=[*lever_callbacks(config), record])
    # cosine warms up to the scaled rate over the first epoch; the others start at it
    assert max(seen) == pytest.approx(2e-3 if schedule == "cosine" else 4e-3)


def test_invalid_config_values_are_named():
    with pytest.raises(ValueError, match="dropout must be in"):
        TrainConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"hidden_dim must be in \[1, 4096\]"):
        TrainConfig(hidden_dim=0)


def test_grouped_output_sums_the_probabilities_of_each_group():
    import keras

    from tf_emnist.model import with_grouped_output

    config = TrainConfig(hidden_dim=8, num_layers=1, jit_compile=False)
    groups = (0, 1, 1, 0, 1)
    fine = build_model(config, len(groups))
    grouped = with_grouped_output(fine, groups)
    x = np.random.default_rng(0).random((6, 28, 28), dtype=np.float32)
    p_fine = keras.ops.convert_to_numpy(keras.ops.softmax(fine(x)))
    out = keras.ops.convert_to_numpy(grouped(x))
    assert out.shape == (6, 2)
    np.testing.assert_allclose(np.exp(out), np.stack([p_fine[:, [0, 3]].sum(1), p_fine[:, [1, 2, 4]].sum(1)], 1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(out)), np.exp(out), rtol=1e-5)
    # The grouped model shares the trained layers: training the fine model changes its answers.
    assert grouped.layers[0] is fine.layers[0]


def test_plateau_halves_the_rate_and_replays_a_resumed_run():
    from tf_emnist.callbacks import HalveOnPlateau as plateau

    fresh = plateau(1e-3)
    for accuracy in (0.5, 0.6, 0.55, 0.58, 0.7):
        fresh.update(accuracy)
    assert fresh.rate == pytest.approx(2.5e-4) and fresh.best == 0.7
    # A run resumed after those epochs starts at the rate the uninterrupted run had.
    resumed = plateau(1e-3, [0.5, 0.6, 0.55, 0.58, 0.7])
    assert (resumed.rate, resumed.best) == (fresh.rate, fresh.best)
    for _ in range(10):
        resumed.update(0.1)
    assert resumed.rate == pytest.approx(1e-3 / 32)  # the floor
