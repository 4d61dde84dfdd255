"""Type stubs for the optional C extension localnet._trigger (see _trigger.c)."""

from collections.abc import Callable
from typing import Any

class Trigger:
    """An event trigger's common case in C: see _trigger.c."""

    routes: dict[str, tuple[Any, ...]]

    def __init__(self, peer: Any, running: Any,
                 slow: Callable[[str, tuple[Any, ...], dict[str, Any]], None],
                 finish: Callable[[Any, str, bytes, Any], None],
                 encode_item: Callable[[str, tuple[Any, ...], dict[str, Any], int], bytes | None],
                 fan_out: Callable[..., Any], ring_fan_out: Callable[..., Any],
                 item_max: int) -> None: ...
    def __call__(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any], /) -> None: ...

class EventCall:
    """The base of localnet.Event: its call in C, see _trigger.c."""

    func: Callable[..., Any]
    name: str
    _live: list[Any]
    _current_peer: Callable[[], Any]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]: ...
