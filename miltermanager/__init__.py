"""milter-manager: a milter that runs other milters and merges their answers."""

__version__ = "0.1.0"
