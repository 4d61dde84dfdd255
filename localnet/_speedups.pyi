from typing import Any

def encode_item(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int, /
) -> bytes | None: ...

def memo_bound(data: bytes | bytearray | memoryview, /) -> int: ...
