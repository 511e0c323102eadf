"""Where the manager creates files (the UNIX socket, the pid file, a log file): can it?"""

import os


def directory_problem(path):
    """Why a file cannot be created at path (its directory missing or not writable), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    return None
