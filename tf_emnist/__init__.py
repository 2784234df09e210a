"""tf-emnist: EMNIST ByMerge handwritten characters with stacked LSTMs in Keras 3.

Importing this package is light: Keras and its backend (TensorFlow or JAX) load on first use.
"""
from tf_emnist.version import __version__
from tf_emnist.config import HYPERPARAMETERS, TrainConfig, read_config_file
from tf_emnist.data import Batches, load_split, split_validation
from tf_emnist.evaluate import compute_metrics, evaluate_run, predict_logits
from tf_emnist.export import export_model
from tf_emnist.model import build_model, compile_model, expected_parameter_count
from tf_emnist.nist import DataError, NistFolder, parse_idx
from tf_emnist.predict import Predictor, read_image
from tf_emnist.preprocess import ImageError, preprocess, segment_line
from tf_emnist.sources import load_source
from tf_emnist.tasks import TASKS, Task, get_task, resolve_config
from tf_emnist.runs import RunDirError, load_run, read_history
from tf_emnist.training import fit_model, train, train_and_evaluate

__all__ = [
    "__version__", "HYPERPARAMETERS", "TrainConfig", "read_config_file",
    "Batches", "load_split", "split_validation",
    "compute_metrics", "evaluate_run", "predict_logits", "load_source",
    "export_model", "Predictor", "read_image", "ImageError", "preprocess", "segment_line",
    "build_model", "compile_model", "expected_parameter_count",
    "DataError", "NistFolder", "parse_idx",
    "TASKS", "Task", "get_task", "resolve_config",
    "RunDirError", "load_run", "read_history", "fit_model", "train", "train_and_evaluate",
]
