"""tf-emnist: EMNIST ByMerge handwritten characters with stacked LSTMs in Keras 3.

Importing this package is light: TensorFlow and Keras load on first use.
"""
__version__ = "0.7.0"

from tf_emnist.config import HYPERPARAMETERS, TrainConfig, read_config_file
from tf_emnist.data import load_split, make_dataset, split_validation
from tf_emnist.evaluate import compute_metrics, evaluate_run, predict_logits
from tf_emnist.export import export_model, make_serving_function
from tf_emnist.model import build_model, compile_model, expected_parameter_count
from tf_emnist.nist import DataError, NistFolder, parse_idx
from tf_emnist.predict import Predictor, read_image
from tf_emnist.preprocess import ImageError, preprocess, segment_line
from tf_emnist.tasks import TASKS, Task, get_task, resolve_config
from tf_emnist.runs import RunDirError, load_run, read_history
from tf_emnist.training import train, train_and_evaluate

__all__ = [
    "HYPERPARAMETERS", "TrainConfig", "read_config_file",
    "load_split", "make_dataset", "split_validation",
    "compute_metrics", "evaluate_run", "predict_logits",
    "export_model", "make_serving_function", "Predictor", "read_image", "ImageError", "preprocess", "segment_line",
    "build_model", "compile_model", "expected_parameter_count",
    "DataError", "NistFolder", "parse_idx",
    "TASKS", "Task", "get_task", "resolve_config",
    "RunDirError", "load_run", "read_history", "train", "train_and_evaluate",
]
