"""tf-emnist's Keras layers, losses and metrics, backend-neutral (keras.ops only).

Registered, so a saved model.keras names them; `tf_emnist.model` imports this module
when it builds a model, which keeps Keras (and TensorFlow) out of a plain `import tf_emnist`.
"""
from __future__ import annotations

import keras
from keras import ops

PACKAGE = "tf_emnist"


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupLogSumExp(keras.layers.Layer):
    """Logits over classes -> log-probabilities of groups of classes (no weights).

    `groups[i]` is the group of class i. softmax of the output is each group's summed
    probability, so the output works as logits wherever logits are expected.
    """

    def __init__(self, groups, **kwargs):
        super().__init__(dtype="float32", **{k: v for k, v in kwargs.items() if k != "dtype"})
        self.groups = [int(g) for g in groups]
        members = ops.one_hot(ops.convert_to_tensor(self.groups), max(self.groups) + 1)
        # [groups, classes]: 0 for a member, a large negative number for the others
        self.mask = (1.0 - ops.transpose(members)) * -1e9

    def call(self, logits):
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        return ops.logsumexp(log_probs[:, None, :] + self.mask[None], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], max(self.groups) + 1)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SmoothedSparseCrossEntropy(keras.losses.Loss):
    """Sparse labels, smoothed: cross-entropy against (1 - e) one-hot + e / classes."""

    def __init__(self, label_smoothing=0.1, num_classes=2, name="smoothed_sparse_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def call(self, y_true, y_pred):
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, [-1]), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing, "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DistillationLoss(keras.losses.Loss):
    """Targets [B, 1 + classes] (the label, then the teacher's logits) against the student's logits:
    alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T || student_T) (tf_emnist.distill)."""

    def __init__(self, temperature=2.0, alpha=0.5, label_smoothing=0.0, name="distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

    def call(self, y_true, y_pred):
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class LabelAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy against the label in column 0 of a distillation target."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred, sample_weight)


class BatchLoss(keras.metrics.Metric):
    """The loss of the latest batch, in training mode (what the study logged), or with `lowest` the lowest
    batch loss since the metrics were reset (an epoch's), kept on the device."""

    def __init__(self, loss_fn, lowest: bool = False, name="batch_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss_fn, self.lowest = loss_fn, lowest
        self.initial = float("inf") if lowest else 0.0
        self.value = self.add_variable(shape=(), initializer=keras.initializers.Constant(self.initial), name="value",
                                       aggregation="mean")

    def reset_state(self):
        self.value.assign(ops.full((), self.initial, self.dtype))

    def update_state(self, y_true, y_pred, sample_weight=None):
        loss = ops.cast(self.loss_fn(y_true, y_pred), self.dtype)
        self.value.assign(ops.minimum(self.value, loss) if self.lowest else loss)

    def result(self):
        return ops.convert_to_tensor(self.value)
