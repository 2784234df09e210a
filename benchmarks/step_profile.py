"""Where a training step's time goes: TensorFlow's profiler over a few steps, summed by op.

Run: python benchmarks/step_profile.py TASK [--steps 10] [--no-lstm-kernel] [--no-bf16-gradients] [--top 30]
     (output kept in results/step_profile-*.txt)

It trains the task's preset (Keras fit, as `train` runs it) on synthetic data, times `--steps`
steps, then profiles as many more with tf.profiler and prints, for each op or XLA thunk, the
time the threads spent in it a step ("thread-ms": with 2 cores, up to 2 x the step's wall
time), and the number of calls a step, in two groups:

- TensorFlow's executor threads: its ops (oneDNN matmuls, transposes, the optimizer), and
  the XLA thunks that run inline on them;
- XLA's thread pool: each recurrence's dots and element-wise fusions. A
  "ThunkExecutor::Execute" is one loop iteration; its time beyond its thunks' is overhead.

Times inside ops overlap when more threads are runnable than there are cores, so a figure is
an upper bound on that op's share, not a timing of it alone.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Profiler events that wrap others (a whole step, an executor, a blocking wait), left out of the tables.
WRAPPERS = re.compile(r"^(ExecutorState|EagerExecute|EagerKernelExecute|EagerLocalExecute|KernelAndDeviceFunc|"
                      r"TFE_Py|multi_step_on_iterator|CpuExecutable|BlockUntilReady|ParallelFor|"
                      r"Iterator::|MakeIterator|PrefetchProduce)")


def op_times(xspace_path: str, steps: int) -> dict[str, collections.Counter]:
    """thread group -> {event name: (picoseconds, calls)} from a profiler XSpace file, a step."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as f:
        space.ParseFromString(f.read())
    groups = {"tensorflow": collections.Counter(), "xla": collections.Counter()}
    calls = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            group = "tensorflow" if line.name.startswith("tf_Compute") else "xla" if "Eigen" in line.name else None
            if group is None:
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if group == "tensorflow":  # "StatefulPartitionedCall/merged_lstm_1/lstm_2_1/add:_MklNativeFusedMatMul"
                    name = re.sub(r"_\d+(?=[:/])", "", name.split("StatefulPartitionedCall/")[-1])
                groups[group][name] += event.duration_ps / steps
                calls[name] += 1 / steps
    return groups, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["digit-letter", "merged"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=30, help="rows a table")
    parser.add_argument("--no-lstm-kernel", action="store_true")
    parser.add_argument("--no-bf16-gradients", action="store_true")
    args = parser.parse_args()

    import tensorflow as tf

    from tf_emnist.bench import cpu_name, synthetic
    from tf_emnist.data import make_dataset
    from tf_emnist.model import build_model, compile_model, describe_lstm_training
    from tf_emnist.tasks import get_task

    task = get_task(args.task)
    config = task.preset.replace(lstm_kernel=False if args.no_lstm_kernel else None,
                                 bf16_gradients=False if args.no_bf16_gradients else None)
    images, labels = synthetic(10240, task.num_classes)
    model = compile_model(build_model(config, task.num_classes), config, track_batch_loss=True)
    data = make_dataset(images, labels, config.batch_size, training=True).repeat()
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    step_ms = (time.perf_counter() - start) / args.steps * 1e3

    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    tf.profiler.experimental.stop()
    groups, calls = op_times(glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb")[0], args.steps)

    threads = os.cpu_count()
    print(f"CPU: {cpu_name()}; {args.task} ({config.num_layers} x {config.hidden_dim} LSTM, batch "
          f"{config.batch_size}), {describe_lstm_training(config)}")
    print(f"a step: {step_ms:.0f} ms unprofiled, {threads} threads: {threads * step_ms:.0f} thread-ms")
    for group, title in (("tensorflow", "TensorFlow's executor threads"), ("xla", "XLA's thread pool")):
        rows = {name: ps for name, ps in groups[group].items() if not WRAPPERS.match(name)}
        loops = groups[group].get("ThunkExecutor::Execute", 0)
        in_ops = sum(ps for name, ps in rows.items() if name != "ThunkExecutor::Execute")
        print(f"\n{title}: {in_ops / 1e9:.0f} thread-ms a step in ops and thunks; "
              f"{loops / 1e9:.0f} in XLA loop iterations, around their thunks")
        for name, ps in sorted(rows.items(), key=lambda item: -item[1])[:args.top]:
            print(f"  {ps / 1e9:8.2f} thread-ms  x{calls[name]:6.1f}  {name[:100]}")


if __name__ == "__main__":
    main()
