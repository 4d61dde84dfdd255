"""Send a large NumPy array to another peer, which returns its checksum.

Needs NumPy (``pip install numpy``, or the ``numpy`` / ``test`` extras)::

    python examples/numpy_array.py serve           # terminal 1: serves until Ctrl-C
    python examples/numpy_array.py send            # terminal 2: sends 64 MiB, prints, exits

The server prints ``serving checksum as 'array-server'; Ctrl-C to stop`` and
one line per array; the sender prints something like::

    sending a float64 array of shape (8388608,), 64.0 MiB
    array-server: shape (8388608,), float64, sha256 3d5f0b...  (0.21 s, 305 MiB/s)
    checksum matches

``send --mib N --count K`` sends K arrays of N MiB.  The array travels
pickled today (protocol 5); it will go through shared memory later, with
no change to this code.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

import localnet

try:
    import numpy as np
except ImportError:  # pragma: no cover - told to the user below
    np = None

SERVER = "array-server"


@localnet.connect()
def checksum(array: Any) -> dict[str, Any]:
    """Shape, dtype and SHA-256 of ``array``'s bytes."""
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()
    print(f"checksum of {array.dtype} array {array.shape}: {digest[:12]}...", flush=True)
    return {"shape": tuple(array.shape), "dtype": str(array.dtype), "sha256": digest}


def serve() -> int:
    """Offer checksum until Ctrl-C or SIGTERM."""
    localnet.serve_forever(localnet.Peer(name=SERVER), ready=lambda: print(
        f"serving checksum as {SERVER!r}; Ctrl-C to stop", flush=True))
    return 0


def send(mib: float, count: int) -> int:
    """Send ``count`` arrays of ``mib`` MiB and compare the checksums."""
    rng = np.random.default_rng(7)
    array = rng.random(int(mib * 2**20) // 8)  # float64: 8 bytes each
    print(f"sending a {array.dtype} array of shape {array.shape}, "
          f"{array.nbytes / 2**20:.1f} MiB", flush=True)
    expected = hashlib.sha256(memoryview(array).cast("B")).hexdigest()
    with localnet.Peer(name="array-sender"):
        for _ in range(count):
            start = time.perf_counter()
            try:
                remote = checksum.on(SERVER, timeout=60)(array)
            except localnet.PeerNotFound:
                print(f"no peer {SERVER!r}: start 'python {sys.argv[0]} serve' first",
                      file=sys.stderr)
                return 1
            elapsed = time.perf_counter() - start
            print(f"{SERVER}: shape {remote['shape']}, {remote['dtype']}, sha256 "
                  f"{remote['sha256'][:12]}...  ({elapsed:.2f} s, "
                  f"{array.nbytes / 2**20 / elapsed:.0f} MiB/s)", flush=True)
            if remote["sha256"] != expected or remote["shape"] != array.shape:
                print("checksum MISMATCH", flush=True)
                return 1
            print("checksum matches", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["serve", "send"])
    parser.add_argument("--mib", type=float, default=64.0, help="array size in MiB (send)")
    parser.add_argument("--count", type=int, default=1, help="arrays to send (send)")
    options = parser.parse_args()
    if np is None:
        print("this example needs NumPy: pip install numpy", file=sys.stderr)
        return 1
    return serve() if options.role == "serve" else send(options.mib, options.count)


if __name__ == "__main__":
    sys.exit(main())
