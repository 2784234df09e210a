"""The stacked-LSTM classifier: the one definition of the architecture and its optimiser."""
from __future__ import annotations

import functools
import math

from tf_emnist.config import TrainConfig
from tf_emnist.lstm_kernel import bf16_matmul_pays, bf16_matmul_speedup, cpu_has_bf16_matmul, kernel_lstm_class

TIME_STEPS = FEATURES = 28


def build_model(config: TrainConfig, num_classes: int, *, use_cudnn="auto"):
    """Input (28, 28) -> LSTM x num_layers -> Dropout -> Dense(num_classes) logits.

    The LSTMs keep Keras's defaults (tanh/sigmoid, no recurrent dropout, no unroll), which
    is what selects the cuDNN kernel on a GPU; `use_cudnn=False` forbids it (to measure it).
    """
    import keras

    dtype = mixed_precision_policy() if config.mixed_precision else None
    lstm_class, options = keras.layers.LSTM, {}
    if use_lstm_kernel(config):
        lstm_class, options = kernel_lstm_class(), {"matmul_dtype": kernel_matmul_dtype(config)}
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

    grouped = _group_layer_class()(list(class_of_source), name="grouped_logits")
    return keras.Sequential([keras.Input(model.input_shape[1:], name="rows"), *model.layers, grouped],
                            name=f"{model.name}_grouped")


def custom_objects() -> dict:
    """The tf-emnist classes a saved model.keras may hold, for keras.saving.load_model."""
    return {"GroupLogSumExp": _group_layer_class(), "KernelLSTM": kernel_lstm_class()}


def keras_lstm_copy(model, config: TrainConfig, num_classes: int):
    """`model` as built with keras.layers.LSTM (what to save): itself, or a copy with its weights."""
    if not use_lstm_kernel(config):
        return model
    plain = build_model(config.replace(lstm_kernel=False, bf16_gradients=None), num_classes)
    plain.set_weights(model.get_weights())
    return plain


def mixed_precision_policy() -> str:
    """float16 on a GPU (tensor cores), bfloat16 on a CPU (no loss scaling needed)."""
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def use_xla(config: TrainConfig) -> bool:
    """XLA doubles LSTM training speed on a CPU; on a GPU it would lose the cuDNN kernel."""
    import tensorflow as tf

    if config.jit_compile is not None:
        return config.jit_compile
    return not tf.config.list_logical_devices("GPU")


def use_lstm_kernel(config: TrainConfig) -> bool:
    """Whether the LSTMs train with tf_emnist.lstm_kernel.

    Default: on a CPU, with XLA on and no mixed precision; its large matmuls in bfloat16
    where that measures faster (`kernel_matmul_dtype`). In float32 it trained at 1.50-1.60x
    Keras's XLA step on digit-letter and 1.30-1.32x on merged on an Intel Xeon (`tf-emnist
    bench`, results/bench/intel-xeon.txt).
    """
    import tensorflow as tf

    if config.lstm_kernel is not None:
        return config.lstm_kernel
    if config.bf16_gradients:
        return True
    return use_xla(config) and not config.mixed_precision and not tf.config.list_logical_devices("GPU")


def kernel_matmul_dtype(config: TrainConfig) -> str:
    """The LSTM kernel's large matmuls: bfloat16 where that measures faster (or when asked), else float32."""
    bf16 = bf16_matmul_pays() if config.bf16_gradients is None else config.bf16_gradients
    return "bfloat16" if bf16 else "float32"


AUTOMATIC = ("jit_compile", "lstm_kernel", "bf16_gradients")  # settings left to the machine when unset


def resolve_choices(config: TrainConfig) -> TrainConfig:
    """`config` with every automatic choice made for this machine (XLA, the LSTM path, its matmul dtype).

    A run records the result, so it can be told afterwards which numerics trained a model,
    and a resume on another machine keeps them.
    """
    kernel = use_lstm_kernel(config)
    return config.replace(jit_compile=use_xla(config), lstm_kernel=kernel,
                          bf16_gradients=kernel and kernel_matmul_dtype(config) == "bfloat16")


def describe_lstm_training(config: TrainConfig) -> str:
    """How the LSTMs train under `config`, in words (for benchmarks and logs)."""
    if not use_lstm_kernel(config):
        return "Keras's LSTM" + (", all in XLA" if use_xla(config) else "")
    dtype = kernel_matmul_dtype(config)
    words = f"tf-emnist's LSTM kernel, {dtype} large matmuls"
    if config.bf16_gradients is None and dtype == "float32" and cpu_has_bf16_matmul():
        words += f" (this CPU's bfloat16 matmul measured {bf16_matmul_speedup():.2f}x its float32 one)"
    return words


REFERENCE_BATCH = 256  # the study's batch, which its learning rate was chosen for


def peak_learning_rate(config: TrainConfig, replicas: int = 1) -> float:
    """The learning rate, times global batch / 256 with `scale_lr` (the linear scaling rule)."""
    if not config.scale_lr:
        return config.learning_rate
    return config.learning_rate * config.batch_size * replicas / REFERENCE_BATCH


def compile_model(model, config: TrainConfig, steps_per_epoch: int = 1, *, track_batch_loss: bool = False,
                  replicas: int = 1):
    """Adam (AdamW when weight_decay > 0), cross-entropy from logits (with a teacher: the distillation
    loss, see tf_emnist.distill), accuracy.

    `track_batch_loss` adds the metric `batch_loss`: the latest batch's loss, for the
    step log (Keras's `loss` is the epoch's running mean). `replicas`: the data-parallel
    replicas, which multiply the global batch (and, with `scale_lr`, the learning rate).
    """
    import keras

    learning_rate = peak = peak_learning_rate(config, replicas)
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
        loss = distillation_loss_class()(config.distill_temperature, config.distill_alpha, config.label_smoothing)
        accuracy = label_accuracy_class()(name="accuracy")
    elif config.label_smoothing > 0:
        # Label smoothing needs one-hot targets; the data stays sparse, so smooth in the loss.
        loss = _smoothed_loss_class()(config.label_smoothing, model.output_shape[-1])
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [accuracy] + ([_batch_loss_class()(loss)] if track_batch_loss else [])
    # The kernel's LSTMs compile their own recurrences; their large matmuls must stay outside XLA (oneDNN).
    jit_compile = use_xla(config) and not use_lstm_kernel(config)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    return model


def lever_callbacks(config: TrainConfig, past_val_accuracy=(), replicas: int = 1, recorded_val_accuracy=()) -> list:
    """The Keras callbacks some levers need, for `train` and the tuner alike.

    Put them before any callback that saves the model: with `ema`, SwapEMAWeights puts the
    averaged weights in the model for validation and at each epoch's end.
    `past_val_accuracy`: the finished epochs' validation accuracy, when a run resumes.
    `replicas` as for compile_model. `recorded_val_accuracy`: for a run without validation
    images (a refit), the validation accuracy per epoch of the run it refits, which the plateau
    schedule follows, so the refit gets that run's learning rates.
    """
    import keras

    callbacks = []
    if config.ema > 0:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if config.lr_schedule == "plateau":
        callbacks.append(_plateau_class()(peak_learning_rate(config, replicas), past_val_accuracy,
                                          recorded_val_accuracy))
    return callbacks


@functools.cache
def _plateau_class():
    import keras

    class HalveOnPlateau(keras.callbacks.Callback):
        """Halve the learning rate after each epoch whose validation accuracy is not a new best.

        Keras's ReduceLROnPlateau with patience 1 and factor 0.5, down to 1/32 of the start,
        but it replays the finished epochs of a resumed run, so the rate after a resume is
        the rate an uninterrupted run would have. Without validation, it follows `recorded`,
        another run's validation accuracy per epoch (a refit of that run).
        """

        def __init__(self, learning_rate, past_val_accuracy=(), recorded=()):
            super().__init__()
            self.start, self.rate, self.best = learning_rate, learning_rate, None
            self.recorded = [float(a) for a in recorded]
            for accuracy in past_val_accuracy:
                self._update(float(accuracy))

        def _update(self, accuracy):
            if self.best is None or accuracy > self.best:
                self.best = accuracy
            else:
                self.rate = max(self.rate / 2, self.start / 32)

        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = self.rate

        def on_epoch_end(self, epoch, logs=None):
            before = self.rate
            if "val_accuracy" in logs:
                self._update(float(logs["val_accuracy"]))
            elif epoch < len(self.recorded):
                self._update(self.recorded[epoch])
            if self.rate != before:
                print(f"\nvalidation accuracy not improved: learning rate {before:.3g} -> {self.rate:.3g}", flush=True)
            logs["learning_rate"] = before

    return HalveOnPlateau


def lstm_parameter_count(input_dim: int, hidden_dim: int) -> int:
    """Weights of one Keras LSTM layer: 4 gates x (input + recurrent kernels + one bias)."""
    return 4 * (hidden_dim * (input_dim + hidden_dim) + hidden_dim)


def expected_parameter_count(config: TrainConfig, num_classes: int) -> int:
    """Parameter count of build_model(config, num_classes), from the formula."""
    directions = 2 if config.bidirectional else 1
    total, width = 0, FEATURES
    for _ in range(config.num_layers):
        total += directions * lstm_parameter_count(width, config.hidden_dim)
        width = directions * config.hidden_dim
    return total + width * num_classes + num_classes


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


@functools.cache
def _smoothed_loss_class():
    import keras

    @keras.saving.register_keras_serializable(package="tf_emnist")
    class SmoothedSparseCrossEntropy(keras.losses.Loss):
        """Sparse labels, smoothed: cross-entropy against (1 - e) one-hot + e / classes."""

        def __init__(self, label_smoothing=0.1, num_classes=2, name="smoothed_sparse_ce", **kwargs):
            super().__init__(name=name, **kwargs)
            self.label_smoothing, self.num_classes = label_smoothing, num_classes

        def call(self, y_true, y_pred):
            one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), self.num_classes)
            return keras.losses.categorical_crossentropy(
                one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
            )

        def get_config(self):
            return {**super().get_config(), "label_smoothing": self.label_smoothing, "num_classes": self.num_classes}

    return SmoothedSparseCrossEntropy


@functools.cache
def _group_layer_class():
    import keras

    @keras.saving.register_keras_serializable(package="tf_emnist")
    class GroupLogSumExp(keras.layers.Layer):
        """Logits over classes -> log-probabilities of groups of classes (no weights).

        `groups[i]` is the group of class i. softmax of the output is each group's summed
        probability, so the output works as logits wherever logits are expected.
        """

        def __init__(self, groups, **kwargs):
            super().__init__(dtype="float32", **{k: v for k, v in kwargs.items() if k != "dtype"})
            self.groups = [int(g) for g in groups]
            members = keras.ops.one_hot(keras.ops.convert_to_tensor(self.groups), max(self.groups) + 1)
            # [groups, classes]: 0 for a member, a large negative number for the others
            self.mask = (1.0 - keras.ops.transpose(members)) * -1e9

        def call(self, logits):
            log_probs = keras.ops.log_softmax(keras.ops.cast(logits, "float32"), axis=-1)
            return keras.ops.logsumexp(log_probs[:, None, :] + self.mask[None], axis=-1)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], max(self.groups) + 1)

        def get_config(self):
            return {**super().get_config(), "groups": self.groups}

    return GroupLogSumExp


@functools.cache
def _batch_loss_class():
    import keras

    class BatchLoss(keras.metrics.Metric):
        """The loss of the latest batch, in training mode (what the study logged)."""

        def __init__(self, loss_fn, name="batch_loss", **kwargs):
            super().__init__(name=name, **kwargs)
            self.loss_fn = loss_fn
            self.value = self.add_variable(shape=(), initializer="zeros", name="value", aggregation="mean")

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.value.assign(keras.ops.cast(self.loss_fn(y_true, y_pred), self.dtype))

        def result(self):
            return self.value

    return BatchLoss


@functools.cache
def distillation_loss_class():
    import keras

    @keras.saving.register_keras_serializable(package="tf_emnist")
    class DistillationLoss(keras.losses.Loss):
        """Targets [B, 1 + classes] (the label, then the teacher's logits) against the student's logits:
        alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T || student_T) (tf_emnist.distill)."""

        def __init__(self, temperature=2.0, alpha=0.5, label_smoothing=0.0, name="distillation", **kwargs):
            super().__init__(name=name, **kwargs)
            self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

        def call(self, y_true, y_pred):
            ops = keras.ops
            y_pred = ops.cast(y_pred, "float32")
            labels = ops.cast(y_true[:, 0], "int32")
            teacher = ops.cast(y_true[:, 1:], "float32") / self.temperature
            one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1])
            hard = keras.losses.categorical_crossentropy(one_hot, y_pred, from_logits=True,
                                                         label_smoothing=self.label_smoothing)
            teacher_log_p = ops.log_softmax(teacher, axis=-1)
            student_log_p = ops.log_softmax(y_pred / self.temperature, axis=-1)
            soft = ops.sum(ops.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
            return self.alpha * hard + (1.0 - self.alpha) * self.temperature ** 2 * soft

        def get_config(self):
            return {**super().get_config(), "temperature": self.temperature, "alpha": self.alpha,
                    "label_smoothing": self.label_smoothing}

    return DistillationLoss


@functools.cache
def label_accuracy_class():
    import keras

    @keras.saving.register_keras_serializable(package="tf_emnist")
    class LabelAccuracy(keras.metrics.SparseCategoricalAccuracy):
        """Accuracy against the label in column 0 of a distillation target."""

        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(y_true[:, :1], y_pred, sample_weight)

    return LabelAccuracy
