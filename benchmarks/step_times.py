"""Training step times, one by one: shows how many steps of one long fit run slow.

Run: python benchmarks/step_times.py digit-letter 200   (or merged; the number of steps)
     python benchmarks/step_times.py digit-letter 200 --no-lstm-kernel   (Keras's LSTM, all in XLA)

tf-emnist's model and compile (the default training step on a CPU: tf-emnist's LSTM
kernel in bfloat16 where the CPU has bfloat16 units, else Keras's LSTM all in XLA), fed
upright numpy arrays; a callback times each step.
Prints every step's milliseconds, then the median, the mean, and the steps slower than
1.5x the median. (The whole-fit waits of tf.data's autotuner fall at the end of a fit or
an epoch, not inside one: see benchmarks/autotune.py.)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(task_name: str, steps: int, lstm_kernel: bool | None) -> None:
    import keras
    import numpy as np

    from tf_emnist.bench import synthetic
    from tf_emnist.model import build_model, compile_model, describe_lstm_training
    from tf_emnist.tasks import get_task

    task = get_task(task_name)
    images, labels = synthetic(steps * task.preset.batch_size, task.num_classes)
    rows = np.ascontiguousarray(images.transpose(0, 2, 1)).astype(np.float32) / 255.0
    config = task.preset.replace(lstm_kernel=lstm_kernel)
    model = compile_model(build_model(config, task.num_classes), config)
    times = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            times.append(1000 * (now - self.last))
            self.last = now

    model.fit(rows, labels, batch_size=task.preset.batch_size, epochs=1, verbose=0, shuffle=False,
              callbacks=[StepTimes()])
    steady = times[3:]  # the first steps compile
    median = statistics.median(steady)
    print(" ".join(f"{t:.0f}" for t in steady))
    print(f"{task_name} ({describe_lstm_training(config)}): median {median:.0f} ms, mean {statistics.mean(steady):.0f} ms a step; "
          f"{sum(t > 1.5 * median for t in steady)} of {len(steady)} steps slower than 1.5x the median")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["digit-letter", "merged"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--lstm-kernel", action=argparse.BooleanOptionalAction, default=None,
                        help="tf-emnist's LSTM training kernel (default: as `train`)")
    args = parser.parse_args()
    main(args.task, args.steps, args.lstm_kernel)
