from typing import Any

def encode_item(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int, /
) -> bytes | None: ...

def encode_call(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int, /
) -> bytes | None: ...

def encode_value(value: Any, limit: int, /) -> bytes | None: ...

def memo_bound(data: bytes | bytearray | memoryview, /) -> int: ...

def load_checked(data: bytes | bytearray | memoryview, /) -> Any: ...

def fan_out(
    lanes: tuple[list[Any], ...], entry: tuple[Any, ...], /
) -> tuple[list[int], list[int]] | None: ...

def ring_fan_out(
    state: list[int], ring: Any, lanes: tuple[list[Any], ...], event: str, item: bytes, /
) -> tuple[list[int], list[int]] | None | bool: ...

def dispatch(
    items: list[Any], start: int, event: str, handler: Any, catalog: Any, table: Any, /
) -> tuple[int, int, Any]: ...
