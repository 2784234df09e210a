"""How fast `tf-emnist serve` answers: model time in the server, and HTTP latency and throughput.

For each export: the model's own time at batch 1 and 1024 as the server runs it (XLA
in-process, and without it for a SavedModel, as TensorFlow Serving would run the portable
file), then a real server on a loopback port with 1 and 16 concurrent clients sending one
image a request, with request batching on (--max-batch-size 64) and off (1).

Usage: python benchmarks/serving.py MODEL [MODEL...] [--requests 200] [--output results/bench/serving.json]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tf_emnist.bench import cpu_name
from tf_emnist.files import write_json


def model_ms(path: str, xla: bool, batch: int, repeats: int) -> float:
    """Median milliseconds of one model call at `batch`, as the server makes it."""
    from tf_emnist.serve import ServedModel

    model = ServedModel(path, xla=xla)
    images = np.random.default_rng(0).integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    model.logits(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.logits(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_figures(path: str, max_batch_size: int, requests: int) -> dict:
    """p50/p99 latency (ms) and requests/s for 1 and 16 clients against a fresh server."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tf_emnist.cli.main", "-q", "serve", path, "--port", str(port),
                               "--max-batch-size", str(max_batch_size)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        name = json.load(urllib.request.urlopen(url + "/v1/models/merged/metadata"))["model_spec"]["name"]
        image = np.random.default_rng(0).integers(0, 256, (1, 28, 28)).tolist()
        body = json.dumps({"instances": image}).encode()

        def one(_):
            start = time.perf_counter()
            request = urllib.request.Request(f"{url}/v1/models/{name}:predict", data=body,
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=60).read()
            return time.perf_counter() - start

        for _ in range(20):
            one(0)
        figures = {}
        for clients in (1, 16):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = sorted(pool.map(one, range(requests)))
            seconds = time.perf_counter() - start
            figures[f"{clients}_clients"] = {
                "p50_ms": 1000 * latencies[len(latencies) // 2],
                "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "requests_per_s": requests / seconds}
        return figures
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count (default 200)")
    parser.add_argument("--output", help="write the figures as JSON")
    args = parser.parse_args()
    results = {"cpu": cpu_name(), "models": {}}
    for path in args.models:
        row = {}
        for xla in (True, False):  # a TFLite export runs its own runtime either way
            key = "xla" if xla else "portable"
            row[f"model_ms_batch1_{key}"] = model_ms(path, xla, 1, 50)
            row[f"model_ms_batch1024_{key}"] = model_ms(path, xla, 1024, 3)
        for batching, size in (("batching", 64), ("no_batching", 1)):
            row[batching] = http_figures(path, size, args.requests)
        results["models"][path] = row
        print(json.dumps({path: row}, indent=1), flush=True)
    if args.output:
        write_json(args.output, results)


if __name__ == "__main__":
    main()
