"""IDX parsing and the NIST folder reader: good files, corrupt files, provenance."""
import gzip
import hashlib
import os
import zipfile

import numpy as np
import pytest

from tests.conftest import idx_bytes, write_nist_folder
from tf_emnist.nist import OFFICIAL_SHA256, DataError, NistFolder, parse_idx


def test_parse_idx_reads_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images), 3, "x"), images)
    labels = np.array([3, 1, 46], np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels), 1, "y"), labels)


def test_parse_idx_rejects_truncated_file():
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data, 3, "images")


def test_parse_idx_rejects_wrong_magic():
    data = bytearray(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    data[2] = 0x0D  # float32 element type
    with pytest.raises(DataError, match="bad IDX magic"):
        parse_idx(bytes(data), 3, "images")
    with pytest.raises(DataError, match="bad IDX magic"):  # a label file where images are expected
        parse_idx(idx_bytes(np.zeros(50, np.uint8)), 3, "images")


def test_parse_idx_rejects_short_header_and_wrong_size():
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00", 1, "labels")
    with pytest.raises(DataError, match="28x28"):
        parse_idx(idx_bytes(np.zeros((2, 32, 32), np.uint8)), 3, "images")


def test_folder_loads_train_and_test(nist_dir):
    folder = NistFolder(nist_dir, "bymerge")
    images, labels = folder.load("train", 47)
    assert images.shape == (240, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (240,) and labels.max() < 47
    assert folder.read_mapping().startswith("0123456789ABC")


def test_label_out_of_range_is_reported(tmp_path):
    path = write_nist_folder(tmp_path / "d", n_train=20, n_test=10)
    bad = np.full(20, 47, np.uint8)
    with gzip.open(os.path.join(path, "emnist-bymerge-train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(bad))
    with pytest.raises(DataError, match="label 47 at index 0 is out of range 0..46"):
        NistFolder(path, "bymerge").load("train", 47)


def test_count_mismatch_and_missing_file(tmp_path):
    path = write_nist_folder(tmp_path / "d", n_train=20, n_test=10)
    with gzip.open(os.path.join(path, "emnist-bymerge-train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        NistFolder(path, "bymerge").load("train", 47)
    os.remove(os.path.join(path, "emnist-bymerge-test-images-idx3-ubyte.gz"))
    with pytest.raises(DataError, match="not found .* --data-dir"):
        NistFolder(path, "bymerge").load("test", 47)
    with pytest.raises(DataError, match="does not exist"):
        NistFolder(tmp_path / "nowhere", "bymerge")


def test_corrupt_gzip_is_reported(tmp_path):
    path = write_nist_folder(tmp_path / "d", n_train=20, n_test=10)
    with open(os.path.join(path, "emnist-bymerge-test-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip file"):
        NistFolder(path, "bymerge").load("test", 47)


def test_gzip_zip_is_accepted(tmp_path, nist_dir):
    zip_path = tmp_path / "gzip.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for name in os.listdir(nist_dir):
            z.write(os.path.join(nist_dir, name), f"gzip/{name}")
    for where in (zip_path, tmp_path):  # the zip itself, or a folder holding it
        images, labels = NistFolder(where, "bymerge").load("test", 47)
        assert len(images) == len(labels) == 120


def test_provenance_by_sha256(nist_dir):
    folder = NistFolder(nist_dir, "bymerge")
    folder.load("test", 47)
    folder.load("train", 47)
    folder.read_mapping()
    assert folder.provenance["emnist-bymerge-test-images-idx3-ubyte.gz"] == "NOT the official NIST file"
    assert folder.provenance["emnist-bymerge-train-images-idx3-ubyte.gz"].startswith("unverified")
    mapping = os.path.join(nist_dir, "emnist-bymerge-mapping.txt")
    with open(mapping, "rb") as f:
        # The fake mapping is written exactly as NIST's, so its checksum must match.
        assert hashlib.sha256(f.read()).hexdigest() == OFFICIAL_SHA256["emnist-bymerge-mapping.txt"]
    assert folder.provenance["emnist-bymerge-mapping.txt"] == "official"


def test_the_sample_script_draws_a_seeded_share_of_train_as_nist_files(tmp_path):
    """scripts/sample_train.py: a train sample the size of the results' subset, and the whole test split."""
    import subprocess
    import sys

    from tf_emnist.config import TrainConfig
    from tf_emnist.data import load_split
    from tf_emnist.tasks import get_task

    source = write_nist_folder(tmp_path / "full", n_train=1000, n_test=50)
    root = os.path.join(os.path.dirname(__file__), "..")
    outs = []
    for name in ("a", "b"):
        outs.append(str(tmp_path / name))
        subprocess.run([sys.executable, os.path.join(root, "scripts", "sample_train.py"), outs[-1], "--data-dir",
                        source], check=True, capture_output=True, timeout=120)
    task = get_task("merged")
    full_images, full_labels = load_split(task, "train", TrainConfig(data_dir=source))
    images, labels = load_split(task, "train", TrainConfig(data_dir=outs[0]))
    assert len(labels) == round(1000 * 123_029 / 697_932)
    rows = {image.tobytes(): label for image, label in zip(full_images, full_labels)}
    assert all(rows[image.tobytes()] == label for image, label in zip(images, labels))  # real pairs, kept together
    again, _ = load_split(task, "train", TrainConfig(data_dir=outs[1]))
    np.testing.assert_array_equal(again, images)  # the seed fixes the draw
    assert len(load_split(task, "test", TrainConfig(data_dir=outs[0]))[1]) == 50
