"""The `tf-emnist` command line: parses arguments and dispatches to the library."""
