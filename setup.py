"""Build the optional C encoder; every other piece of metadata is in pyproject.toml.

``localnet._speedups`` is optional (like MarkupSafe's): without a compiler the
build goes on without it and localnet runs in pure Python, a little slower
per event trigger.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("localnet._speedups", ["localnet/_speedups.c"], optional=True)])
