from typing import Any

def encode_item(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int, /
) -> bytes | None: ...
