"""Read the official NIST EMNIST files (IDX, gzip) from a folder or gzip.zip, with checks."""
from __future__ import annotations

import gzip
import hashlib
import os
import zipfile

import numpy as np

# sha256 of official NIST release files we know (from ../shared/data/emnist-bymerge/README.md).
OFFICIAL_SHA256 = {
    "emnist-bymerge-test-images-idx3-ubyte.gz": "5e5815ec1b522089134435f7c55e75a00960b58414793593ffff23efc0821683",
    "emnist-bymerge-test-labels-idx1-ubyte.gz": "8bda1516255683ba9071e141947ca0c91a911176065cdd6259b0b4d8dc5b5f35",
    "emnist-bymerge-mapping.txt": "956dc507bf69e9f31f4e3e876d22ec66124aa229b5d0bd65ab8956a8044d3ede",
}
# The official split sizes, to tell the full release from a subset.
OFFICIAL_COUNTS = {
    ("bymerge", "train"): 697_932, ("bymerge", "test"): 116_323,
    ("balanced", "train"): 112_800, ("balanced", "test"): 18_800,
    ("byclass", "train"): 697_932, ("byclass", "test"): 116_323,
    ("digits", "train"): 240_000, ("digits", "test"): 40_000,
    ("mnist", "train"): 60_000, ("mnist", "test"): 10_000,
}
_IDX_DTYPE = 0x08  # unsigned byte: the only element type EMNIST uses


class DataError(ValueError):
    """A data file is missing, corrupt or not what the task needs (message: one line)."""


def file_name(split: str, part: str, kind: str) -> str:
    """NIST's name of a file: kind is 'images' or 'labels', part 'train' or 'test'."""
    ndim = 3 if kind == "images" else 1
    return f"emnist-{split}-{part}-{kind}-idx{ndim}-ubyte.gz"


def parse_idx(data: bytes, ndim: int, name: str) -> np.ndarray:
    """An IDX byte string as a uint8 array of `ndim` dimensions, every header field checked."""
    fix = "re-download it or point --data-dir at an intact copy"
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes); {fix}")
    zero, dtype, dims = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype != _IDX_DTYPE or dims != ndim:
        raise DataError(
            f"{name}: bad IDX magic {data[:4].hex()} (expected 000008{ndim:02x}, uint8 with {ndim} dims); "
            f"not an EMNIST {'image' if ndim == 3 else 'label'} file; {fix}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(f"{name}: {what}: header says {shape} = {expected} bytes, file holds {payload}; {fix}")
    if ndim == 3 and shape[1:] != (28, 28):
        raise DataError(f"{name}: images are {shape[1]}x{shape[2]}, EMNIST's are 28x28; {fix}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, the data."""
    header = bytes([0, 0, _IDX_DTYPE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_split(folder: str | os.PathLike, split: str, part: str, images: np.ndarray, labels: np.ndarray) -> None:
    """NIST's two gzip files of a split's part (images as stored, the split's labels), written atomically."""
    from tf_emnist.files import atomic_path

    for kind, array in (("images", images), ("labels", labels)):
        with atomic_path(os.path.join(folder, file_name(split, part, kind))) as tmp:
            with gzip.open(tmp, "wb", compresslevel=6) as f:
                f.write(idx_bytes(array))


def write_mapping(folder: str | os.PathLike, split: str, chars: str) -> None:
    """emnist-<split>-mapping.txt: each label and its character's code, as NIST writes it."""
    from tf_emnist.files import atomic_path

    with atomic_path(os.path.join(folder, f"emnist-{split}-mapping.txt")) as tmp:
        with open(tmp, "w", newline="") as f:
            f.writelines(f"{i} {ord(c)}\r\n" for i, c in enumerate(chars))


class NistFolder:
    """The files of one EMNIST split in a folder of NIST files, or in NIST's gzip.zip.

    Accepts: a folder holding emnist-<split>-*.gz (or uncompressed) files, a folder holding
    gzip.zip, or the path of gzip.zip itself.
    """

    def __init__(self, path: str | os.PathLike, split: str):
        self.path = os.fspath(path)
        self.split = split
        if not os.path.exists(self.path):
            raise DataError(f"data dir {self.path} does not exist here; pass --data-dir a folder with the NIST EMNIST "
                            "files (an export names its data folder only)")
        self.provenance: dict[str, str] = {}  # file name -> 'official', 'NOT the official ...', 'unverified ...'
        zip_path = self.path if self.path.endswith(".zip") else os.path.join(self.path, "gzip.zip")
        try:
            self._zip = zipfile.ZipFile(zip_path) if os.path.isfile(zip_path) else None
        except zipfile.BadZipFile:
            raise DataError(f"{zip_path} is not a zip archive (damaged or incomplete?); download NIST's gzip.zip "
                            "again, or point --data-dir at a folder of its .gz files") from None

    def _read_member(self, name: str) -> tuple[bytes, str] | None:
        """Raw bytes of `name` (looked up as .gz, then uncompressed) and the name found."""
        candidates = [name, name[:-3]] if name.endswith(".gz") else [name]
        for candidate in candidates:
            if self._zip is not None:
                for member in (candidate, f"gzip/{candidate}"):
                    if member in self._zip.namelist():
                        return self._zip.read(member), candidate
            else:
                path = os.path.join(self.path, candidate)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        return f.read(), candidate
        return None

    def read(self, name: str) -> tuple[bytes, str]:
        """Bytes of file `name`, decompressed; raises DataError when it is missing or corrupt.

        Records the file's provenance (see `provenance`) from the bytes read.
        """
        found = self._read_member(name)
        if found is None:
            raise DataError(
                f"{name} not found in {self.path}; --data-dir needs NIST's gzip/ files "
                f"(emnist-{self.split}-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte.gz, "
                f"emnist-{self.split}-mapping.txt) or gzip.zip"
            )
        raw, found_name = found
        official = OFFICIAL_SHA256.get(found_name)
        if official is None:
            self.provenance[name] = "unverified (no official checksum on record)"
        else:
            matches = hashlib.sha256(raw).hexdigest() == official
            self.provenance[name] = "official" if matches else "NOT the official NIST file"
        if found_name.endswith(".gz"):
            try:
                return gzip.decompress(raw), found_name
            except (OSError, EOFError) as e:
                raise DataError(f"{found_name} in {self.path} is not a valid gzip file ({e}); re-download it") from None
        return raw, found_name

    def read_mapping(self) -> str:
        """The split's characters, label by label, from emnist-<split>-mapping.txt."""
        name = f"emnist-{self.split}-mapping.txt"
        data, _ = self.read(name)
        pairs = []
        for line_no, line in enumerate(data.decode("ascii", "replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                pairs.append((int(parts[0]), chr(int(parts[1]))))
            except (IndexError, ValueError):
                raise DataError(f"{name}: line {line_no} is not '<label> <ascii code>': {line!r}") from None
        labels = [label for label, _ in pairs]
        if labels != list(range(len(labels))):
            raise DataError(f"{name}: labels are not 0..{len(labels) - 1} in order")
        return "".join(char for _, char in pairs)

    def load(self, part: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [N, 28, 28] as stored, labels uint8 [N]) of 'train' or 'test', validated."""
        img_name, lab_name = file_name(self.split, part, "images"), file_name(self.split, part, "labels")
        images = parse_idx(self.read(img_name)[0], 3, img_name)
        labels = parse_idx(self.read(lab_name)[0], 1, lab_name)
        if len(images) != len(labels):
            raise DataError(
                f"{img_name} holds {len(images)} images but {lab_name} {len(labels)} labels; the files do not belong together"
            )
        if len(labels) and labels.max() >= num_classes:
            bad = int(np.argmax(labels >= num_classes))
            raise DataError(
                f"{lab_name}: label {labels[bad]} at index {bad} is out of range 0..{num_classes - 1}; "
                f"is this the {self.split} split's file?"
            )
        return images, labels
