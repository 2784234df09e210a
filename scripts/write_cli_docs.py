#!/usr/bin/env python3
"""Write docs/cli.md from the CLI's parser (tests/test_cli.py checks that it is current)."""
import os

from tf_emnist.cli.main import cli_reference

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "cli.md")
with open(path, "w") as f:
    f.write(cli_reference())
print(f"wrote {os.path.normpath(path)}")
