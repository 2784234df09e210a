"""The benchmark's own measurements (its figures are printed, never asserted)."""
import subprocess
import sys

import numpy as np

from tf_emnist.bench import peak_rss_mb


def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    ballast = np.ones(400 * 2**20 // 8)  # the parent holds 400 MB more than the child ever will
    assert peak_rss_mb() > 400
    child = subprocess.run([sys.executable, "-c", "from tf_emnist.bench import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert 0 < float(child.stdout.strip().splitlines()[-1]) < 300
    del ballast
