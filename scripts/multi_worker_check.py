#!/usr/bin/env python3
"""Does Keras `fit` train under tf.distribute.MultiWorkerMirroredStrategy with the installed versions?

Starts two workers on 127.0.0.1, each with its TF_CONFIG, as TensorFlow's multi-worker
Keras tutorial does. Each builds tf-emnist's model (a tiny merged-task config) in the
strategy's scope and fits 2 epochs of 4 steps on the same synthetic data. Training works
when both workers finish with the same weights. Prints the verdict, and otherwise the
error each worker raised. Exits 0 when it works, 1 when it does not. Bounded by --timeout,
and once a worker has ended without training, the other gets 20 s more to fail too: it may
instead wait for ever on its dead peer.

Usage: python scripts/multi_worker_check.py [--timeout 180]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FAILED_PEER_GRACE_S = 20  # how long the other worker may take to fail too, once one has ended without training


def worker(index: int, ports: list[int]) -> None:
    """One worker: fit under MultiWorkerMirroredStrategy and print the weights' checksum as JSON."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_emnist.bench import synthetic
    from tf_emnist.config import TrainConfig
    from tf_emnist.data import Batches
    from tf_emnist.feeding import tf_dataset
    from tf_emnist.model import build_model, compile_model

    print("making the strategy (connecting to the other worker)", flush=True)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    print(f"strategy made: {strategy.num_replicas_in_sync} replicas; fitting", flush=True)
    config = TrainConfig(task="merged", hidden_dim=8, num_layers=1, batch_size=32, jit_compile=False)
    images, labels = synthetic(512, 47)
    ds = tf_dataset(Batches(images, labels, config.batch_size * strategy.num_replicas_in_sync, training=True)).repeat()
    with strategy.scope():
        model = compile_model(build_model(config, 47), config)
    keras.config.disable_traceback_filtering()  # to name the frame in Keras that fails
    try:
        model.fit(ds, epochs=2, steps_per_epoch=4, verbose=0, shuffle=False)
    except Exception as e:  # reported by the parent, which gives the verdict
        keras_frames = [f for f in traceback.extract_tb(e.__traceback__) if f"keras{os.sep}src" in f.filename]
        where = keras_frames[-1] if keras_frames else traceback.extract_tb(e.__traceback__)[-1]
        message = " ".join(str(e).split())
        if len(message) > 200:  # e.g. a whole tensor printed in the middle: keep the two ends, whole words
            message = message[:60].rsplit(" ", 1)[0] + " ... " + message[-110:].split(" ", 1)[1]
        print(json.dumps({"error": f"{type(e).__name__}: {message}",
                          "where": f"{where.filename.split('site-packages' + os.sep)[-1]}:{where.lineno} in {where.name}"}),
              flush=True)
        return
    checksum = float(sum(np.abs(w).sum() for w in model.get_weights()))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "checksum": checksum}), flush=True)


def read(log) -> str:
    """All a worker has written so far to its log file."""
    log.seek(0)
    return log.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=180, help="seconds the workers may take (default 180)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, [int(p) for p in args.ports.split(",")])
        return 0

    import keras
    import tensorflow as tf

    print(f"Keras {keras.__version__}, TensorFlow {tf.__version__}: two workers on 127.0.0.1", flush=True)
    ports = ",".join(str(free_port()) for _ in range(2))
    start = time.monotonic()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Files, not pipes, so that a chatty worker can't block. Appending: the worker shares the
    # file's offset, which read() moves.
    logs = [tempfile.TemporaryFile("a+") for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--ports", ports], env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True) for i, log in enumerate(logs)]
    deadline = time.monotonic() + args.timeout
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        if any(proc.poll() is not None and '"checksum"' not in read(log) for proc, log in zip(procs, logs)):
            # One worker ended without training: the other may wait for its collectives for ever.
            deadline = min(deadline, time.monotonic() + FAILED_PEER_GRACE_S)
        time.sleep(0.2)
    outputs = []
    for proc, log in zip(procs, logs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            outputs.append(read(log) + f"\nstill running after {time.monotonic() - start:.0f} s (killed)")
        else:
            outputs.append(read(log))
    results, failed = [], 0
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if reports and "checksum" in reports[-1]:
            results.append(reports[-1])
        elif reports:
            failed += 1
            print(f"worker {i}: {reports[-1]['error']}\n  raised at {reports[-1]['where']}")
        else:
            print(f"worker {i}: {(out.strip().splitlines() or ['no output'])[-1]}")
    if len(results) == 2 and results[0] == results[1] and results[0]["replicas"] == 2:
        print(f"works: 2 workers trained in sync (weight checksum {results[0]['checksum']:.6f} on both)")
        return 0
    if failed:
        print("does not work: Keras fit failed under MultiWorkerMirroredStrategy")
    elif len(results) == 2:
        print(f"does not work: the workers disagree: {results}")
    else:
        print(f"does not work: the workers did not finish in {args.timeout:.0f} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
