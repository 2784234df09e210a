from setuptools import find_packages, setup

setup(
    name="tf-emnist",
    version="0.1.0",
    description="Handwritten character recognition on EMNIST ByMerge with stacked LSTMs (Keras 3 / TensorFlow)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_emnist", "tf_emnist.*", "cli", "tuning"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds's etils[epath] extra; without it tfds fails to import on TF 2.21
        "keras-tuner>=1.4.7",
        "tensorboard",  # keras-tuner needs it; tensorflow 2.21 no longer pulls it in
        "matplotlib>=3.7",
        "numpy",
        "pillow",
        "scipy",
        "scikit-image",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
    },
    entry_points={"console_scripts": ["tf-emnist=cli.main:main"]},
)
