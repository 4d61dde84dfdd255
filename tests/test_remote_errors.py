"""A BaseException raised in another peer never ends the caller's process."""

from __future__ import annotations

CALLEE = """
@localnet.connect()
def leave(code):
    sys.exit(code)

@localnet.connect()
def interrupt():
    raise KeyboardInterrupt("pressed in the callee")

@localnet.connect()
def echo(x):
    return x

localnet.serve_forever(localnet.Peer(name="callee"), ready=lambda: say("READY"))
"""

CALLER = """
for attempt in (lambda: localnet.peer("callee").leave(3),
                lambda: localnet.peer("callee").interrupt()):
    try:
        attempt()
        say("RETURNED")
    except localnet.RemoteError as exc:
        say("REMOTE", exc.type_name, "|", exc.message, "|",
            "Traceback" in exc.remote_traceback)
    except localnet.LocalnetError as exc:
        say("OTHER", type(exc).__name__, exc)
say("ECHO", localnet.peer("callee").echo(42))
say("END")
"""


def test_remote_system_exit_and_keyboard_interrupt_arrive_as_remote_error(spawn) -> None:
    # The caller used to exit with the callee's status 3, and to stop as on
    # a Ctrl-C; neither was caught by `except LocalnetError`.
    spawn(CALLEE)
    caller = spawn(CALLER, ready=None)
    lines = caller.collect(until="END")
    assert caller.wait_exit() == 0, caller.stderr
    assert lines == [
        "REMOTE builtins.SystemExit | 3 | True",
        "REMOTE builtins.KeyboardInterrupt | pressed in the callee | True",
        "ECHO 42",  # the callee goes on serving: a connection's exit ends only its call
    ], lines
