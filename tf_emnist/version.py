"""tf-emnist's version, in a module that imports nothing."""
__version__ = "0.8.0"
