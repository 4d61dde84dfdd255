"""Large payloads through shared memory: correctness, zero copy, lifetime, no leaks."""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import psutil
import pytest
from helpers import wait_until

import localnet
from localnet import _shm

pytestmark = pytest.mark.skipif(not _shm.AVAILABLE, reason="needs memfd (Linux)")

MIB = 1024 * 1024

SERVER = """
import numpy as np
kept = []

@localnet.connect()
def describe(value):
    if isinstance(value, np.ndarray):
        return {"type": "ndarray", "shape": value.shape, "dtype": str(value.dtype),
                "writable": bool(value.flags.writeable), "sum": float(value.sum()) if
                value.dtype.kind in "fiub" else None, "shared": _shared(value)}
    if isinstance(value, (bytearray, memoryview, bytes)):
        return {"type": type(value).__name__, "len": len(value),
                "head": bytes(value[:4]), "readonly": getattr(value, "readonly", None)}
    return {"type": type(value).__name__}

def _shared(array):
    import mmap
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
        if isinstance(base, memoryview):
            base = base.obj
    return isinstance(base, mmap.mmap)

@localnet.connect()
def echo(value):
    return value

@localnet.connect()
def make(n, fill):
    return np.full(n, fill, dtype=np.float64)

@localnet.connect()
def keep(value):
    kept.append(value)
    return len(kept)

@localnet.connect()
def check_kept():
    return [float(v[0]) for v in kept]

@localnet.connect()
def forget():
    kept.clear()
    import gc; gc.collect()
    return True

@localnet.connect()
def resources():
    import gc; gc.collect()
    localnet._shm.POOL.trim(everything=True)  # idle segments would go in a few seconds
    proc = __import__("psutil").Process()
    return {"fds": proc.num_fds(), "rss": proc.memory_info().rss,
            "maps": sum(1 for m in proc.memory_maps(grouped=False)
                        if "memfd:localnet" in m.path)}

@localnet.subscribe("frame")
def on_frame(array, tag=None):
    say("FRAME", tag, array.shape, float(array[0]), bool(array.flags.writeable))

peer = localnet.Peer(name=os.environ.get("NAME", "server"))
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.connect()
def describe(value):
    raise AssertionError("runs remotely")


@localnet.connect()
def echo(value):
    return value


@localnet.connect()
def make(n, fill):
    raise AssertionError("runs remotely")


@pytest.fixture
def server(spawn):
    return spawn(SERVER)


@pytest.mark.parametrize("dtype", ["float64", "float32", "int16", "uint8", "complex128", "bool"])
def test_arrays_of_every_dtype_arrive_intact(server, dtype: str) -> None:
    array = (np.arange(MIB) % 7).astype(dtype)  # at least the 1 MiB threshold
    with localnet.Peer(name="client"):
        info = describe(array, peer="server")
        back = echo(array, peer="server")
    assert info["shape"] == array.shape and info["dtype"] == dtype
    assert info["shared"] is True and info["writable"] is False
    assert back.dtype == array.dtype and np.array_equal(back, array)


@pytest.mark.parametrize("make_array", [
    lambda: np.arange(3 * MIB, dtype=np.float64).reshape(3, 1024, -1),
    lambda: np.asfortranarray(np.arange(MIB, dtype=np.float32).reshape(1024, -1)),
    lambda: np.arange(4 * MIB, dtype=np.float64).reshape(2048, -1)[:, ::3],  # non-contiguous
    lambda: np.arange(2 * MIB, dtype=np.int32)[::-2],  # negative strides
], ids=["3d", "fortran", "strided", "reversed"])
def test_shapes_and_layouts_round_trip(server, make_array) -> None:
    array = make_array()
    with localnet.Peer(name="client"):
        back = echo(array, peer="server")
    assert back.shape == array.shape and np.array_equal(back, array)


def test_bytearray_and_memoryview_go_through_shared_memory(server) -> None:
    blob = bytearray(os.urandom(2 * MIB))
    with localnet.Peer(name="client"):
        info = describe(blob, peer="server")
        assert info == {"type": "bytearray", "len": len(blob), "head": bytes(blob[:4]),
                        "readonly": None}
        view_info = describe(memoryview(blob), peer="server")
        assert view_info["type"] == "memoryview" and view_info["readonly"] is True
        assert bytes(echo(memoryview(blob), peer="server")) == bytes(blob)
        assert echo(blob, peer="server") == blob


def test_bytearray_larger_than_max_frame_goes_through_shared_memory(server) -> None:
    # The C pickler writes a bytearray into the stream without asking
    # reducer_override: a 300 MB one was refused as over max_frame.
    blob = bytearray(300 * MIB)
    blob[:4], blob[-1] = b"head", 7
    with localnet.Peer(name="client", max_frame=64 * MIB):
        info = describe(blob, peer="server")
        assert info == {"type": "bytearray", "len": len(blob), "head": b"head",
                        "readonly": None}
        # The reply is over the server's own max_frame (256 MiB) and the client's.
        back = echo(blob, peer="server")
        assert type(back) is bytearray and back == blob
        back[0] = 0  # a private copy, writable
        nested = echo({"frames": [blob, blob], "n": 1}, peer="server")
        assert nested["n"] == 1 and nested["frames"][0] == blob
        assert nested["frames"][0] is nested["frames"][1]  # one object, sent once
        assert type(nested["frames"][0]) is bytearray


def test_small_buffers_stay_inline(server) -> None:
    with localnet.Peer(name="client"):
        info = describe(np.arange(10), peer="server")
    assert info["shared"] is False


def test_large_results_come_back_through_shared_memory(server) -> None:
    with localnet.Peer(name="client"):
        result = make(4 * MIB, 2.5, peer="server")
        assert result.shape == (4 * MIB,) and float(result[-1]) == 2.5
        assert result.flags.writeable is False  # a read-only view of shared pages
        mine = result.copy()
        mine[0] = 1.0  # a copy is private and writable
        assert float(result[0]) == 2.5


def test_received_data_outlives_the_sender(spawn, server) -> None:
    sender = spawn("""
        import numpy as np
        @localnet.connect()
        def keep(value): pass
        with localnet.Peer(name="sender"):
            for fill in (1.0, 2.0, 3.0):
                localnet.peer("server").keep(np.full(MIB, fill))
        say("READY")
    """.replace("MIB", str(MIB)))
    assert sender.wait_exit() == 0
    with localnet.Peer(name="client"):
        assert localnet.peer("server").check_kept() == [1.0, 2.0, 3.0]
        assert localnet.peer("server").forget() is True


def test_event_buffer_is_written_once_for_every_subscriber(spawn) -> None:
    subscribers = [spawn(SERVER, NAME=f"sub{i}") for i in range(3)]

    @localnet.event("frame")
    def frame(*args, **kwargs):
        return args, kwargs

    with localnet.Peer(name="pub") as me:
        before = _shm.POOL.created + _shm.POOL.reused
        frame(np.full(2 * MIB, 7.0), tag="big")
        me.flush(20)
        assert _shm.POOL.created + _shm.POOL.reused == before + 1  # one segment for all three
        for child in subscribers:
            assert child.expect("FRAME").split() == ["FRAME", "big", "(2097152,)", "7.0", "False"]


def test_allocation_api_sends_only_a_descriptor(server) -> None:
    array = localnet.empty((1024, 1024), dtype=np.float32)
    array[:] = 3.0
    assert isinstance(array, np.ndarray) and array.flags.writeable
    assert np.array_equal(localnet.zeros(5), np.zeros(5))
    with localnet.Peer(name="client"):
        before = _shm.POOL.created + _shm.POOL.reused
        info = describe(array, peer="server")
        part = describe(array[100:200], peer="server")
        assert _shm.POOL.created + _shm.POOL.reused == before  # no copy into the pool
        assert info["sum"] == 3.0 * 1024 * 1024 and info["shared"] is True
        assert part["shape"] == [100, 1024] or part["shape"] == (100, 1024)
        assert part["sum"] == 3.0 * 100 * 1024


def test_memory_and_descriptors_return_after_many_transfers(server) -> None:
    proc = psutil.Process()
    with localnet.Peer(name="client"):
        remote = localnet.peer("server")
        for _ in range(20):  # warm up: pool, channels, mappings, allocator
            echo(np.ones(MIB), peer="server")
        server_before = remote.resources()
        _shm.POOL.trim(everything=True)
        fds_before = proc.num_fds()
        rss_before = proc.memory_info().rss
        for i in range(1000):
            array = np.full(MIB // 8 * (1 + i % 4), float(i))  # 1 to 4 MiB, both ways
            back = echo(array, peer="server")
            assert float(back[-1]) == float(i)
            del back
        _shm.POOL.trim(everything=True)
        wait_until(lambda: remote.resources()["fds"] == server_before["fds"], timeout=10,
                   what="the server's descriptors to return")
        server_after = remote.resources()
        assert server_after["maps"] == server_before["maps"] == 0
        assert server_after["rss"] - server_before["rss"] < 32 * MIB
        assert proc.num_fds() == fds_before
        assert proc.memory_info().rss - rss_before < 32 * MIB
        assert not _memfd_maps(os.getpid())
        assert _shm.POOL.reused > 900  # segments were reused, not made anew


def test_killed_sender_frees_everything(spawn) -> None:
    taken: list[int] = []

    @localnet.connect()
    def take(value):
        taken.append(value.nbytes)
        return value.nbytes

    proc = psutil.Process()
    with localnet.Peer(name="receiver"):
        baseline = proc.num_fds()
        sender = spawn("""
            import numpy as np
            @localnet.connect()
            def take(value): pass
            with localnet.Peer(name="sender"):
                say("READY")
                while True:
                    localnet.peer("receiver").take(np.ones(MIB // 2))
        """.replace("MIB", str(MIB)))
        wait_until(lambda: len(taken) > 20, what="transfers to flow")
        sender.signal(signal.SIGKILL)  # in the middle of its stream of transfers
        sender.wait_exit()
        sender.stop()

        def settled() -> bool:
            gc.collect()
            return proc.num_fds() == baseline and not _memfd_maps(os.getpid())

        wait_until(settled, timeout=10, what="the receiver's descriptors and mappings to return")


def test_killed_receiver_frees_everything(spawn) -> None:
    victim = spawn(SERVER, NAME="victim")
    with localnet.Peer(name="client"):
        remote = localnet.peer("victim")
        remote.keep(np.ones(4 * MIB))
        remote.keep(localnet.zeros(MIB))
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        _shm.POOL.trim(everything=True)
        wait_until(lambda: not _memfd_maps(os.getpid()), timeout=10,
                   what="this process to hold no shared segment")


def test_shared_memory_can_be_switched_off(spawn) -> None:
    spawn(SERVER, LOCALNET_SHM="off")
    with localnet.Peer(name="client", shm_threshold=None):
        info = describe(np.ones(2 * MIB), peer="server")
        back = echo(np.arange(MIB), peer="server")
    assert info["shared"] is False and info["writable"] is True
    assert np.array_equal(back, np.arange(MIB))


def test_threshold_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("LOCALNET_SHM", "lots")
    with pytest.raises(localnet.ConfigurationError, match="LOCALNET_SHM"):
        localnet.Peer(name="x")
    with pytest.raises(localnet.ConfigurationError, match="shm_threshold"):
        localnet.Peer(name="x", shm_threshold=-5)
    monkeypatch.setenv("LOCALNET_SHM", "4096")
    assert localnet.Peer(name="x").shm_threshold == 4096


def _memfd_maps(pid: int) -> list[str]:
    try:
        return [m.path for m in psutil.Process(pid).memory_maps(grouped=False)
                if "memfd:localnet" in m.path]
    except psutil.Error:
        return []


def test_oversized_inline_payload_is_refused_where_it_is_sent(server) -> None:
    with localnet.Peer(name="client", max_frame=64 * 1024) as me:
        with pytest.raises(localnet.SerializationError, match="over the 65536-byte"):
            echo(b"x" * 100_000, peer="server")

        @localnet.event("frame")
        def frame(*args, **kwargs):
            return args, kwargs

        with pytest.raises(localnet.SerializationError, match="over the 65536-byte"):
            frame(b"y" * 100_000)
        me.flush(10)
        assert echo(np.ones(MIB), peer="server").shape == (MIB,)  # shared memory is fine
