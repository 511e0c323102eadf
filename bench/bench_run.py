"""bench/run as a module (it has no .py suffix), for the other benchmarks: its build, load, /proc
and process helpers. Loading it puts the repository first on sys.path."""

import importlib.machinery
import importlib.util
import os


def load():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run")
    loader = importlib.machinery.SourceFileLoader("bench_run", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_run", loader))
    loader.exec_module(module)
    return module
