"""How TensorFlow's and PyTorch's float32 matmuls scale from one core to two at the LSTM's shapes.

Run: python benchmarks/matmul_threads.py   (output kept in results/matmul_threads-intel.txt)

A training step's recurrence multiplies 256 x 256 by 256 x 1,024 (merged, forward) or
256 x 1,024 by 1,024 x 256 (backward) at each of its 28 steps: matmuls of about half a
millisecond. TensorFlow sizes its thread pools once a process, so each thread count runs
in a child process, which times XLA's dot, TensorFlow's MatMul (oneDNN) and, when PyTorch is
installed, torch.mm (MKL in its wheel), the same way as benchmarks/cpu_ceiling.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHAPES = ((256, 256, 1024), (256, 1024, 256), (512, 256, 1024))


def child(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    from cpu_ceiling import matmul_gflops, torch_matmul_gflops

    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    for shape in SHAPES:
        torch_rate = torch_matmul_gflops(*shape)
        print(f"  {threads} thread{'s' if threads > 1 else ''}, {'x'.join(map(str, shape)):>13}: "
              f"XLA {matmul_gflops(*shape, True):4.0f}, TensorFlow (oneDNN) {matmul_gflops(*shape, False):4.0f}"
              + (f", PyTorch {torch_rate:4.0f}" if torch_rate else "") + " GFLOP/s", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    from tf_emnist.bench import cpu_name

    print(f"CPU: {cpu_name()}; float32 matmuls, one thread and two", flush=True)
    for threads in (1, 2):
        subprocess.run([sys.executable, __file__, "--child", str(threads)], check=True)


if __name__ == "__main__":
    main()
