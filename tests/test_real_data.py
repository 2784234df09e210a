"""Real EMNIST (TF_EMNIST_DATA_DIR): a short training run must beat chance by far."""
import pytest

from tf_emnist.config import TrainConfig
from tf_emnist.training import train_and_evaluate

pytestmark = pytest.mark.real_data


def test_short_training_on_real_images_is_far_above_chance(real_data_dir, tmp_path):
    config = TrainConfig(task="merged", data_dir=real_data_dir, hidden_dim=64, num_layers=2, epochs=2,
                         learning_rate=3e-3, limit_train=30_000, limit_test=10_000, log_every=50)
    metrics = train_and_evaluate(config, str(tmp_path / "run"), verbose=0)
    assert metrics["test_examples"] == 10_000
    assert metrics["test_accuracy"] > 0.5  # chance is 1/47; this run measured 0.72
    assert metrics["digit_letter_accuracy"] > 0.7  # measured 0.84
    zero, big_o = metrics["per_class_accuracy"]["0"], metrics["per_class_accuracy"]["O"]
    assert zero is not None and big_o is not None
