"""localnet benchmark suite: localnet against the alternatives, side by side in one run.

Run ``python -m benchmarks --help``. Scenarios live in one module each (``call``,
``fanout``, ``large``, ``startup``, ``peers``); every server, client, publisher and
subscriber runs in its own freshly spawned process (``python -m benchmarks.<module>``).
"""
