"""Build the optional C extensions; every other piece of metadata is in pyproject.toml.

``localnet._speedups`` (the event item encoder and fan-outs), ``localnet._trigger``
(a trigger's common case, built on them) and ``localnet._fastcall``
(the socket side of a small call, both ends) are optional (like MarkupSafe's): without
a compiler the build goes on without them and localnet runs in pure Python,
a little slower per event trigger and per call.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("localnet._speedups", ["localnet/_speedups.c"], optional=True),
    Extension("localnet._trigger", ["localnet/_trigger.c"], optional=True),
    Extension("localnet._fastcall",
              ["localnet/_fastcall.c", "localnet/_fastserve.c", "localnet/_frames.c"],
              depends=["localnet/_frames.h"], optional=True),
])
