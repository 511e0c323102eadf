"""argparse types the command-line tools share: each says what was expected."""

import argparse


def _integer(value):
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None


def positive(value):
    """A whole number, 1 or more."""
    number = _integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


def not_negative(value):
    """A whole number, 0 or more."""
    number = _integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return number


def seconds(value):
    """A number of seconds above 0 (a timeout)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def port(value):
    """A TCP port, 1 to 65535."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return number
