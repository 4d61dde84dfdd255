from typing import Any

SEND_TIMEOUT: int
EOF: int
CUT_SHORT: int
RECV_TIMEOUT: int
BAD_HEADER: int
BAD_FDS: int
LARGE: int
SEND_FAILED: int
SMALL_REPLY: int

def roundtrip(
    fd: int, ident: int, payload: bytes | bytearray | memoryview, deadline: float | None,
    max_frame: int, spin: float = 0.0, /
) -> tuple[Any, Any, Any, Any]: ...

def recv_frame(fd: int, buffer: bytearray, max_frame: int, /) -> tuple[Any, Any, Any, Any]: ...

def send_frame(fd: int, kind: int, ident: int, body: bytes | bytearray | memoryview, /) -> None: ...

def send_now(fd: int, data: bytes | bytearray | memoryview, /) -> int: ...

def recv_now(fd: int, size: int, /) -> bytes | None: ...

HANDED: int
SHARED: int

def serve_calls(
    sock: Any, buffer: bytearray, max_frame: int, conn: Any, server: Any, watchdog: Any,
    host: Any, /
) -> tuple[Any, Any, Any, Any]: ...

def calls_state() -> tuple[int, int, int]: ...
