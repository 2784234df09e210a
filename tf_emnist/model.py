"""The stacked-LSTM classifier: the one definition of the architecture and its optimiser."""
from __future__ import annotations

import math

from tf_emnist.config import TrainConfig, expected_parameter_count, lstm_parameter_count  # noqa: F401 (the model's)

TIME_STEPS = FEATURES = 28


def build_model(config: TrainConfig, num_classes: int, *, use_cudnn="auto"):
    """Input (28, 28) -> LSTM x num_layers -> Dropout -> Dense(num_classes) logits.

    The LSTMs keep Keras's defaults (tanh/sigmoid, no recurrent dropout, no unroll), which
    is what selects the cuDNN kernel on a GPU; `use_cudnn=False` forbids it (to measure it).
    """
    import keras

    from tf_emnist.backend import kernel_matmul_dtype, mixed_precision_policy, use_lstm_kernel

    dtype = mixed_precision_policy() if config.mixed_precision else None
    lstm_class, options = keras.layers.LSTM, {}
    if use_lstm_kernel(config):
        from tf_emnist.lstm_kernel import KernelLSTM

        lstm_class, options = KernelLSTM, {"matmul_dtype": kernel_matmul_dtype(config)}
    layers = [keras.Input((TIME_STEPS, FEATURES), name="rows")]
    for i in range(config.num_layers):
        lstm = lstm_class(
            config.hidden_dim, return_sequences=i < config.num_layers - 1, dtype=dtype, use_cudnn=use_cudnn,
            name=f"lstm_{i}", **options,
        )
        layers.append(keras.layers.Bidirectional(lstm, name=f"bilstm_{i}") if config.bidirectional else lstm)
    layers += [
        keras.layers.Dropout(config.dropout, dtype=dtype, name="dropout"),
        # float32 logits even under mixed precision, so the softmax/loss stay stable
        keras.layers.Dense(num_classes, dtype="float32", name="logits"),
    ]
    return keras.Sequential(layers, name=f"{config.task.replace('-', '_')}_lstm")


def with_grouped_output(model, class_of_source):
    """`model` (logits over a split's classes) followed by GroupLogSumExp: the task's logits.

    For `fine_labels`: the network learns the 47 ByMerge classes and the saved model answers
    digit or letter, log P(group) = logsumexp of log P(class) over the group's classes. The
    result is a plain Keras model, so evaluate, export and predict see a 2-class model.
    """
    import keras

    from tf_emnist.layers import GroupLogSumExp

    grouped = GroupLogSumExp(list(class_of_source), name="grouped_logits")
    return keras.Sequential([keras.Input(model.input_shape[1:], name="rows"), *model.layers, grouped],
                            name=f"{model.name}_grouped")


def custom_objects() -> dict:
    """The tf-emnist classes a saved model.keras may hold, for keras.saving.load_model."""
    from tf_emnist.backend import on_jax
    from tf_emnist.layers import GroupLogSumExp

    objects = {"GroupLogSumExp": GroupLogSumExp}
    if not on_jax():  # the TensorFlow kernel's layer, in a model saved while training with it
        from tf_emnist.lstm_kernel import KernelLSTM

        objects["KernelLSTM"] = KernelLSTM
    return objects


def plain_copy(model, config: TrainConfig, num_classes: int):
    """`model` as built with keras.layers.LSTM, with its weights, uncompiled: what a run saves, which plain
    Keras loads on any backend (its training kernel and metrics stay out of the file)."""
    plain = build_model(config.replace(lstm_kernel=False, bf16_gradients=None), num_classes)
    plain.set_weights(model.get_weights())
    return plain


REFERENCE_BATCH = 256  # the study's batch, which its learning rate was chosen for


def peak_learning_rate(config: TrainConfig) -> float:
    """The learning rate, times batch / 256 with `scale_lr` (the linear scaling rule)."""
    if not config.scale_lr:
        return config.learning_rate
    return config.learning_rate * config.batch_size / REFERENCE_BATCH


def compile_model(model, config: TrainConfig, steps_per_epoch: int = 1, *, track_batch_loss: bool = False,
                  steps_per_execution: int = 1):
    """Adam (AdamW when weight_decay > 0), cross-entropy from logits (with a teacher: the distillation
    loss, see tf_emnist.distill), accuracy.

    `track_batch_loss` adds the metrics `batch_loss` (the latest batch's loss) and
    `lowest_batch_loss` (the epoch's lowest), for the step log (Keras's `loss` is the
    epoch's running mean). `steps_per_execution`: training steps compiled into one call (Keras's).
    """
    import keras

    from tf_emnist.backend import mixed_precision_policy, use_lstm_kernel, use_xla
    from tf_emnist.layers import BatchLoss, DistillationLoss, LabelAccuracy, SmoothedSparseCrossEntropy

    learning_rate = peak = peak_learning_rate(config)
    if config.lr_schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(steps_per_epoch, total // 2)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else peak, decay_steps=total - warmup,
            warmup_target=peak if warmup else None, warmup_steps=warmup,
        )
    options = {"clipnorm": config.clipnorm} if config.clipnorm > 0 else {}
    if config.ema > 0:
        options.update(use_ema=True, ema_momentum=config.ema)
    if config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay, **options)
    else:
        optimizer = keras.optimizers.Adam(learning_rate, **options)
    if config.mixed_precision and mixed_precision_policy() == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    accuracy = "accuracy"
    if config.teacher:  # targets are [label, teacher's logits...]
        loss = DistillationLoss(config.distill_temperature, config.distill_alpha, config.label_smoothing)
        accuracy = LabelAccuracy(name="accuracy")
    elif config.label_smoothing > 0:
        # Label smoothing needs one-hot targets; the data stays sparse, so smooth in the loss.
        loss = SmoothedSparseCrossEntropy(config.label_smoothing, model.output_shape[-1])
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [accuracy]
    if track_batch_loss:
        metrics += [BatchLoss(loss), BatchLoss(loss, lowest=True, name="lowest_batch_loss")]
    # The kernel's LSTMs compile their own recurrences; their large matmuls must stay outside XLA (oneDNN).
    jit_compile = use_xla(config) and not use_lstm_kernel(config)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    return model


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)
