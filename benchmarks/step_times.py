"""Training step times, one by one: shows the two speeds that training steps run at on this machine.

Run: python benchmarks/step_times.py digit-letter 200   (or merged; the number of steps)

tf-emnist's model and compile (XLA), fed upright numpy arrays; a callback times each step.
Prints every step's milliseconds, then the median, the mean, and the steps slower than
1.5x the median.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(task_name: str, steps: int) -> None:
    import keras
    import numpy as np

    from tf_emnist.bench import synthetic
    from tf_emnist.model import build_model, compile_model
    from tf_emnist.tasks import get_task

    task = get_task(task_name)
    images, labels = synthetic(steps * task.preset.batch_size, task.num_classes)
    rows = np.ascontiguousarray(images.transpose(0, 2, 1)).astype(np.float32) / 255.0
    model = compile_model(build_model(task.preset, task.num_classes), task.preset)
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
    print(f"{task_name}: median {median:.0f} ms, mean {statistics.mean(steady):.0f} ms a step; "
          f"{sum(t > 1.5 * median for t in steady)} of {len(steady)} steps slower than 1.5x the median")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
