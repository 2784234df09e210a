"""Shared fixtures: a seed per test, tiny NIST-format data written on the fly, the real-data path."""
import contextlib
import gzip
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from tf_emnist.nist import idx_bytes
from tf_emnist.tasks import BYMERGE_CHARS

REAL_DATA_ENV = "TF_EMNIST_DATA_DIR"
SAVED_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saved_models")


def shipped_models() -> dict[str, str]:
    """The shipped models (saved_models/shipped.json): "merged/6" -> its path. A user's own exports in
    saved_models/ are not among them."""
    import json

    with open(os.path.join(SAVED_MODELS, "shipped.json")) as f:
        return {name: os.path.join(SAVED_MODELS, name) for name in json.load(f)["models"]}


def shipped(folder: str) -> str:
    """The shipped model in a task folder, e.g. shipped("merged-tflite")."""
    return next(path for name, path in shipped_models().items() if name.split("/")[0] == folder)


def pytest_configure(config):
    import tensorflow as tf

    # Two logical CPUs, set before TensorFlow starts, so MirroredStrategy can be tested here.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def environment():
    """Each test starts from the same environment variables (a command may set some, e.g. keras-tuner's)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def seed():
    import keras

    keras.utils.set_random_seed(1234)


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Learnable fake EMNIST images (stored transposed): bright bars that encode the label.

    Upright row label % 28 is bright; labels >= 28 also get a bright last upright column.
    """
    images = rng.integers(0, 40, (len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, :, label % 28] = 255  # stored column == upright row
        if label >= 28:
            images[i, 27, :] = 255
    return images


def write_nist_folder(path, n_train=240, n_test=120, split="bymerge", chars=BYMERGE_CHARS, seed=0):
    """A folder of NIST-named gzip IDX files and the mapping; returns the path."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, len(chars), n).astype(np.uint8)
        for kind, array in (("images", make_images(labels, rng)), ("labels", labels)):
            ndim = 3 if kind == "images" else 1
            with gzip.open(os.path.join(path, f"emnist-{split}-{part}-{kind}-idx{ndim}-ubyte.gz"), "wb") as f:
                f.write(idx_bytes(array))
    with open(os.path.join(path, f"emnist-{split}-mapping.txt"), "w", newline="") as f:
        f.writelines(f"{i} {ord(c)}\r\n" for i, c in enumerate(chars))  # as NIST writes it
    return str(path)


def run_cli(*args) -> int:
    """The CLI's exit code, whether it returns it or argparse exits with it."""
    from tf_emnist.cli.main import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: str):
    """`tf-emnist serve MODEL` in a subprocess on a free loopback port; yields (base URL, process)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tf_emnist.cli.main", "serve", model, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()}")
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the server did not answer within 180 s")
                time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        process.stdout.close()


@pytest.fixture(scope="package")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run of a tiny merged model on fake data (read-only: export, predict, serve it)."""
    from tf_emnist.config import TrainConfig
    from tf_emnist.training import train

    root = tmp_path_factory.mktemp("tiny")
    config = TrainConfig(data_dir=write_nist_folder(root / "nist"), epochs=1, hidden_dim=8, num_layers=1,
                         batch_size=32, jit_compile=False)
    train(config, str(root / "run"), verbose=0)
    return str(root / "run")


@pytest.fixture
def nist_dir(tmp_path):
    return write_nist_folder(tmp_path / "nist")


@pytest.fixture
def real_data_dir():
    path = os.environ.get(REAL_DATA_ENV)
    if not path or not os.path.isdir(path):
        pytest.skip(f"set {REAL_DATA_ENV} to a folder of NIST EMNIST ByMerge files to run real-data tests")
    return path
