"""Batches into Keras: a tf.data pipeline with prefetching on TensorFlow, a PyDataset elsewhere."""
from __future__ import annotations

import keras
import numpy as np

from tf_emnist.data import Batches

WORKERS = 2  # threads that gather and transform batches ahead of the step (PyDataset)
QUEUE = 8  # batches made ahead


class BatchSequence(keras.utils.PyDataset):
    """`Batches` as a keras.utils.PyDataset: numpy batches made by worker threads ahead of the step."""

    def __init__(self, batches: Batches, workers: int = WORKERS):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=QUEUE)
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step):
        return self.batches[step]


def feed(batches: Batches):
    """What Keras fit, evaluate and predict take: tf.data on TensorFlow (the design's input pipeline, which
    tf.distribute strategies copy to their devices ahead of the step), a PyDataset on other backends."""
    if keras.backend.backend() == "tensorflow":
        return tf_dataset(batches)
    return BatchSequence(batches)


def tf_dataset(batches: Batches):
    """A tf.data pipeline of `batches`: made by parallel calls, in order, prefetched.

    With the autotuner off, AUTOTUNE means one call per CPU core (at most 16) and the
    prefetch buffer still grows on demand. The autotuner re-plans on a timer, and under
    Keras fit an epoch that ends between two of its rounds waits for the next one.
    """
    import tensorflow as tf

    classes = batches.classes
    y_type, y_shape = (tf.int32, [None]) if classes is None else (tf.float32, [None, 1 + classes])

    def load(step):
        x, y = tf.numpy_function(lambda i: batches[int(i)], [step], [tf.float32, y_type], stateful=False)
        return tf.ensure_shape(x, [None, 28, 28]), tf.ensure_shape(y, y_shape)

    options = tf.data.Options()
    options.autotune.enabled = False
    ds = tf.data.Dataset.range(len(batches)).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(batches))).with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_batches(model, batches: Batches) -> np.ndarray:
    """A model's outputs on every batch (their targets unused), float64 [N, classes], in order."""
    return np.asarray(model.predict(feed(batches), verbose=0), np.float64)
