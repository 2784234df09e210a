"""Where a model trains: the Keras backend, its devices and processes, and the choices they imply.

The one place that asks which backend runs or which devices there are. Keras reads its
backend once, at its first import, so `select_backend` runs before anything imports Keras.
TensorFlow is imported only on the TensorFlow backend: on JAX a run trains, evaluates and
plots in a process where TensorFlow cannot be imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from tf_emnist.config import BACKENDS, TrainConfig

DEFAULT_BACKEND = "tensorflow"
ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")


def requested_backend(name: str | None = None) -> str:
    """The backend asked for: `name`, else KERAS_BACKEND, else tensorflow; a one-line error for others."""
    name = name or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def select_backend(name: str | None = None) -> str:
    """Make `name` (see requested_backend) the Keras backend of this process, and return it.

    Before Keras is imported this sets KERAS_BACKEND; afterwards the backend Keras runs must
    be the one asked for (a process cannot switch).
    """
    name = requested_backend(name)
    if "keras" in sys.modules:
        running = active_backend()
        if running != name:
            raise ValueError(f"this process already runs Keras on {running}; start a new process with "
                             f"--backend {name} (or KERAS_BACKEND={name})")
    else:
        os.environ["KERAS_BACKEND"] = name
    if name == "jax":
        _keep_tensorflow_out()
    return name


def _keep_tensorflow_out() -> None:
    """On JAX, nothing tf-emnist runs needs TensorFlow, but Keras imports it wherever it is installed (to
    seed it, to recognise its types when saving): seconds and hundreds of MB for nothing, and its C++
    log lines. Keras's lazy handle on TensorFlow is told that it is absent; exports still import it."""
    from keras.src.utils import module_utils

    if getattr(module_utils.tensorflow, "module", None) is None:  # not imported already
        module_utils.tensorflow._available = False


def load_tensorflow(show_logs: bool = False) -> None:
    """Import TensorFlow and start its devices now, its C++ log lines (oneDNN's notice, a failed CUDA
    start on a machine without a GPU) hidden unless `show_logs`: they look like failures and are not."""
    with _native_stderr(show_logs):
        import tensorflow as tf

        tf.config.list_logical_devices()


@contextlib.contextmanager
def _native_stderr(show: bool):
    """Inside, what native code writes to the process's stderr is dropped (unless `show`)."""
    if show:
        yield
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def active_backend() -> str:
    """The backend Keras runs in this process (importing Keras, which reads KERAS_BACKEND)."""
    import keras

    return keras.backend.backend()


def on_jax() -> bool:
    return active_backend() == "jax"


def gpu_names() -> list[str]:
    """The accelerators this process trains on (every process's, on JAX)."""
    if on_jax():
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices() if d.platform != "cpu"]
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices("GPU")]


def framework_versions() -> dict:
    """The versions of the backend that runs, for a run's record."""
    import keras

    versions = {"backend": active_backend(), "keras": keras.__version__}
    if on_jax():
        import jax

        versions["jax"] = jax.__version__
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


# -- the automatic choices a run makes and records (config.AUTOMATIC)

def mixed_precision_policy() -> str:
    """float16 on a GPU (tensor cores), bfloat16 on a CPU (no loss scaling needed)."""
    return "mixed_float16" if gpu_names() else "mixed_bfloat16"


def use_xla(config: TrainConfig) -> bool:
    """Whether the train step is compiled by XLA: always on JAX; on TensorFlow on a CPU (where it trains
    LSTMs faster), not on a GPU (where it would lose the cuDNN kernel)."""
    if config.jit_compile is not None:
        return config.jit_compile
    return on_jax() or not gpu_names()


def use_lstm_kernel(config: TrainConfig) -> bool:
    """Whether the LSTMs train with tf_emnist.lstm_kernel (TensorFlow only).

    Default: on a CPU, with XLA on and no mixed precision; its large matmuls in bfloat16
    where that measures faster (`kernel_matmul_dtype`).
    """
    if on_jax():
        return False
    if config.lstm_kernel is not None:
        return config.lstm_kernel
    if config.bf16_gradients:
        return True
    return use_xla(config) and not config.mixed_precision and not gpu_names()


def kernel_matmul_dtype(config: TrainConfig) -> str:
    """The LSTM kernel's large matmuls: bfloat16 where that measures faster (or when asked), else float32."""
    from tf_emnist.lstm_kernel import bf16_matmul_pays

    bf16 = bf16_matmul_pays() if config.bf16_gradients is None else config.bf16_gradients
    return "bfloat16" if bf16 else "float32"


def check_backend_settings(config: TrainConfig) -> None:
    """A one-line ValueError for settings the running backend cannot honour."""
    backend = active_backend()
    if config.backend and config.backend != backend:
        raise ValueError(f"the run is set to train on {config.backend}, and this process runs Keras on {backend}; "
                         f"rerun with --backend {config.backend}")
    if backend == "jax" and (config.lstm_kernel or config.bf16_gradients):
        raise ValueError("the LSTM kernel (--lstm-kernel, --bf16-gradients) is TensorFlow's; drop them or use "
                         "--backend tensorflow")
    if backend == "jax" and config.strategy != "default":
        raise ValueError("--strategy mirrored is TensorFlow's; on JAX every device trains data-parallel already")


def resolve_choices(config: TrainConfig) -> TrainConfig:
    """`config` with every automatic choice made for this machine: the backend, XLA, the LSTM path, its
    matmul dtype. A run records the result, so it can be told afterwards which numerics trained a
    model, and a resume on another machine keeps them."""
    check_backend_settings(config)
    kernel = use_lstm_kernel(config)
    return config.replace(backend=active_backend(), jit_compile=use_xla(config), lstm_kernel=kernel,
                          bf16_gradients=kernel and kernel_matmul_dtype(config) == "bfloat16")


def describe_lstm_training(config: TrainConfig) -> str:
    """How the LSTMs train under `config`, in words (for benchmarks and logs)."""
    if not use_lstm_kernel(config):
        words = "Keras's LSTM" + (", all in XLA" if use_xla(config) else "")
        return words + (" (JAX)" if on_jax() else "")
    from tf_emnist.lstm_kernel import bf16_matmul_speedup, cpu_has_bf16_matmul

    dtype = kernel_matmul_dtype(config)
    words = f"tf-emnist's LSTM kernel, {dtype} large matmuls"
    if config.bf16_gradients is None and dtype == "float32" and cpu_has_bf16_matmul():
        words += f" (this CPU's bfloat16 matmul measured {bf16_matmul_speedup():.2f}x its float32 one)"
    return words


# -- devices and processes

@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes that train one run together (JAX): where process 0 listens, how many, which this is.

    One process (the default) needs no coordinator. Several are joined by
    `keras.distribution.initialize`; each reads its own shard of every batch, and only
    process 0 writes.
    """

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError("several processes need --coordinator HOST:PORT (process 0's address)")
        if self.coordinator:
            host, _, port = self.coordinator.split(",")[0].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--coordinator must be HOST:PORT with a port in 1-65535, got {self.coordinator!r}")

    @classmethod
    def from_settings(cls, coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> "Cluster":
        """The cluster from flags, each unset one from Keras's KERAS_DISTRIBUTION_* variables."""
        def number(value, variable, default):
            if value is not None:
                return value
            text = os.environ.get(variable)
            try:
                return int(text) if text else default
            except ValueError:
                raise ValueError(f"{variable} must be an integer, got {text!r}") from None

        return cls(coordinator or os.environ.get(ENV_COORDINATOR) or None,
                   number(num_processes, ENV_PROCESSES, 1), number(process_id, ENV_PROCESS_ID, 0))

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (process 0 does; the others only read it)."""
        return self.process_id == 0


_joined: Cluster | None = None


def join(cluster: Cluster) -> None:
    """Join the other processes (JAX's multi-controller runtime), once a process, before any computation.

    On CPUs the processes' collectives run over Gloo.
    """
    global _joined
    if not cluster.distributed or _joined == cluster:
        return
    if _joined is not None:
        raise ValueError("this process already joined another cluster")
    if not on_jax():
        raise ValueError("several processes train on JAX only (--backend jax): Keras fit fails under TensorFlow's "
                         "MultiWorkerMirroredStrategy (docs/training.md)")
    import jax
    import keras

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    _joined = cluster


def joined() -> bool:
    """Whether this process joined a cluster of several."""
    return _joined is not None


def data_parallel():
    """keras.distribution.DataParallel over every device of every process (JAX), or None for one device.

    Each process feeds its own shard of each batch (auto_shard_dataset off).
    """
    import keras

    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)


def replica_count(distribution) -> int:
    return 1 if distribution is None else len(distribution.device_mesh.devices.flatten())


@contextlib.contextmanager
def local_only():
    """No distribution inside: what process 0 saves or evaluates alone needs no other process.

    Saving a model under a distribution would create variables across processes, which
    waits for every process to do the same.
    """
    import keras

    saved = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(saved)


def barrier(name: str) -> None:
    """Wait until every process of the cluster gets here."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def tf_strategy(name: str, gpus=None):
    """The tf.distribute strategy to train under (TensorFlow).

    "default": OneDeviceStrategy on the GPU when there is exactly one, else TensorFlow's
    default strategy. "mirrored": MirroredStrategy over the local GPUs (else the CPUs).
    `gpus` (logical devices; default: the GPUs TensorFlow sees) lets a test stand a CPU in.

    A GPU strategy's distributed dataset copies batches to its devices ahead of the step.
    For one GPU this replaces tf.data's prefetch_to_device, which hides the dataset's
    length from Keras: its first epoch ran as "Unknown" steps and ended with the warning
    "Your input ran out of data; interrupting training".
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU") if gpus is None else gpus
    if name == "default":
        return tf.distribute.OneDeviceStrategy(gpus[0].name) if len(gpus) == 1 else tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices=devices)
