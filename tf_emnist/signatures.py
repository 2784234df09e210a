"""The TensorFlow graphs that read raw images: what an export's signatures hold (TensorFlow only)."""
from __future__ import annotations

from tf_emnist.config import TrainConfig

IMAGE_SHAPE = (None, 28, 28)
SPLIT_FROM = 256  # batches this large are classified in two halves at once


def image_spec():
    import tensorflow as tf

    return tf.TensorSpec(IMAGE_SHAPE, tf.uint8, name="images")


def make_serving_function(model, class_names, config: TrainConfig, *, stored_orientation: bool = False,
                          xla: bool = False, split: bool = True):
    """A tf.function: uint8 images [N, 28, 28] -> logits, probabilities, class_ids, characters.

    Images are upright (rows are the character's rows, light ink on dark, as EMNIST shows
    them), or as NIST/tfds store them with `stored_orientation`. Scaling and orientation
    happen inside the graph. `xla`: the numeric part is marked for XLA compilation.
    `split`: classify large batches in two halves side by side.
    """
    import tensorflow as tf

    # The model reads upright rows when trained with config.upright, stored rows otherwise.
    transpose = stored_orientation == config.upright

    def classify(images):  # the numeric part, XLA-compiled when asked (strings cannot be)
        x = tf.cast(images, tf.float32) / 255.0
        if transpose:
            x = tf.transpose(x, [0, 2, 1])
        return tf.cast(model(x, training=False), tf.float32)

    classify = tf.function(classify, jit_compile=xla)

    def in_halves(images):
        # Two independent launches, which TensorFlow's executor runs side by side on a CPU's cores.
        half = tf.shape(images)[0] // 2
        return tf.concat([classify(images[:half]), classify(images[half:])], axis=0)

    @tf.function(input_signature=[image_spec()])
    def serve(images):
        if not split:
            return graph_outputs(classify(images), class_names)
        logits = tf.cond(tf.shape(images)[0] >= SPLIT_FROM, lambda: in_halves(images), lambda: classify(images))
        return graph_outputs(logits, class_names)

    return serve


def make_ensemble_function(members: list, weights: list[int], class_names):
    """A tf.function like make_serving_function's, answering with the members' weighted mean probability.

    `members` are serving functions (uint8 images -> a dict with "logits"); a member that is
    itself an ensemble of k models weighs k, so every model counts once. The logits are the
    log of the mean probability, so softmax gives the ensemble's probabilities back
    (tf_emnist.sources.ensemble_logits computes the same in numpy).
    """
    import tensorflow as tf

    log_weights = tf.math.log(tf.constant(weights, tf.float32) / sum(weights))

    @tf.function(input_signature=[image_spec()])
    def serve(images):
        log_probabilities = tf.stack([tf.nn.log_softmax(member(images=images)["logits"]) for member in members])
        logits = tf.reduce_logsumexp(log_probabilities + log_weights[:, None, None], axis=0)
        return graph_outputs(logits, class_names)

    return serve


def graph_outputs(logits, class_names) -> dict:
    """A signature's outputs from its logits, in the graph (tf_emnist.sources.outputs: the same in numpy)."""
    import tensorflow as tf

    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits), "class_ids": class_ids,
            "characters": tf.gather(tf.constant(list(class_names)), class_ids)}
