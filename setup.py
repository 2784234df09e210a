import re

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("tf_emnist/version.py").read()).group(1)

setup(
    name="tf-emnist",
    version=VERSION,
    license="Apache-2.0",
    description="Handwritten character recognition on EMNIST ByMerge with stacked LSTMs (Keras 3 / TensorFlow)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # cli/ and tuning/ stay top-level folders in the repository but install as tf_emnist.cli and
    # tf_emnist.tuning, so nothing but tf_emnist lands in site-packages.
    packages=["tf_emnist", "tf_emnist.cli", "tf_emnist.tuning"],
    package_dir={"tf_emnist": "tf_emnist", "tf_emnist.cli": "cli", "tf_emnist.tuning": "tuning"},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorflow-datasets>=4.9.6",  # its EMNIST builder (3.1.0) has NIST's current URL
        "requests",
        "importlib_resources",  # tfds's etils[epath] extra; without it tfds fails to import on TF 2.21
        "keras-tuner>=1.4.7",
        "tensorboard",  # keras-tuner needs it; tensorflow 2.21 no longer pulls it in
        "matplotlib>=3.7",
        "numpy",
        "pillow",
        "scipy",
        "scikit-image",
        "psutil; platform_system == 'Windows'",  # peak memory where the resource module is missing
    ],
    extras_require={
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18"],
        # Keras's JAX backend (CPU wheels; for NVIDIA GPUs install JAX's CUDA build, see docs/training.md)
        "jax": ["jax>=0.4.34"],
        "test": ["pytest>=8", "selenium>=4.20", "starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18",
                 "jax>=0.4.34"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
    },
    package_data={"tf_emnist": ["static/*.html"]},
    entry_points={"console_scripts": ["tf-emnist=tf_emnist.cli.main:run"]},
)
