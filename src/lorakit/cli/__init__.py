"""The `lorakit` command line: `main(argv) -> int`, callable in-process from tests."""

from .main import main

__all__ = ["main"]
