"""What the `lowrank` command line accepts: a parser whose errors are one line and exit 2, and the
value types of its options, each naming what it expected."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 2 like every other input error (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


positive_int = int_in(1, None, "a positive integer")
port_number = int_in(0, 65535, "a TCP port in [0, 65535]")


def float_in(accepts, what: str):
    """An argparse type: a float for which `accepts(value)` holds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


seconds = float_in(lambda v: 0 <= v < float("inf"), "a finite number of seconds >= 0")
ratio_value = float_in(lambda v: 0 < v < 1, "a ratio in (0, 1)")
positive_float = float_in(lambda v: 0 < v < float("inf"), "a positive number")
