"""Training speed of the study's model under Keras 3's TensorFlow and JAX backends, alternating.

Run: python benchmarks/keras_backends.py merged --jax-python /path/to/venv-with-jax/bin/python

Each backend needs its own process (Keras picks it at import), and JAX need not be in
tf-emnist's environment: `python -m venv /tmp/jv && /tmp/jv/bin/pip install "jax[cpu]" keras`.
The same Keras Sequential model (LSTMs, Dropout, Dense), XLA-compiled, fed numpy arrays,
trains for --steps steps after a warm-up; the rounds alternate and the medians are printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np, keras
hidden, classes, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((28, 28))] + [keras.layers.LSTM(hidden, return_sequences=i < 2) for i in range(3)]
                         + [keras.layers.Dropout(0.2), keras.layers.Dense(classes)])
model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
rng = np.random.default_rng(0)
x = rng.random(((steps + 5) * 256, 28, 28), dtype=np.float32)
y = rng.integers(0, classes, len(x))
model.fit(x[:5 * 256], y[:5 * 256], batch_size=256, epochs=1, verbose=0)
start = time.perf_counter()
model.fit(x[5 * 256:], y[5 * 256:], batch_size=256, epochs=1, verbose=0, shuffle=False)
print(json.dumps({"backend": keras.backend.backend(), "samples_per_s": steps * 256 / (time.perf_counter() - start)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("digit-letter", "merged"))
    parser.add_argument("--jax-python", required=True, help="a Python with jax and keras installed")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hidden, classes = (256, 47) if args.task == "merged" else (128, 2)
    pythons = {"tensorflow": sys.executable, "jax": args.jax_python}
    rates = {backend: [] for backend in pythons}
    for _ in range(args.rounds):
        for backend, python in pythons.items():
            run = subprocess.run([python, "-c", CHILD, str(hidden), str(classes), str(args.steps)], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"})
            rates[backend].append(json.loads(run.stdout.strip().splitlines()[-1])["samples_per_s"])
    for backend, values in rates.items():
        print(f"{args.task} {backend}: {statistics.median(values):,.0f} samples/s "
              f"({', '.join(f'{v:,.0f}' for v in values)})")
    print(f"jax / tensorflow: {statistics.median(rates['jax']) / statistics.median(rates['tensorflow']):.2f}x")


if __name__ == "__main__":
    main()
