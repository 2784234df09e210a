"""Hyperparameter search for tf-emnist with keras-tuner."""
