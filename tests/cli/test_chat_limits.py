"""``roost chat`` refuses a message over 64 KiB at once, naming the limit, and sends nothing."""

from __future__ import annotations

from datetime import UTC

from roost.cli.chat import ChatController, ChatView
from roost.protocol.frames import MAX_BODY_BYTES
from tests.cli.test_chat import FakeClient, settle


async def test_a_too_large_paste_is_refused_before_it_is_drawn_or_sent() -> None:
    client = FakeClient()
    view = ChatView(tz=UTC)
    ctrl = ChatController(client, view, clock=lambda: 1000.0)  # type: ignore[arg-type]
    await ctrl.start()
    try:
        await settle()
        ctrl.handle_line("/to bob")
        await settle()
        ctrl.handle_line("x" * (MAX_BODY_BYTES + 10))
        # No await: the refusal is there as soon as the line was handled.
        text = view.render_text()
        assert f"not sent: message is {MAX_BODY_BYTES + 10:,} bytes; the limit is {MAX_BODY_BYTES:,}" in text
        assert "xxxxxxxx" not in text  # no pending line for it
        await settle()
        assert not [c for c in client.calls if c[0] == "send"]
        ctrl.handle_line("y" * MAX_BODY_BYTES)  # at the limit: sent
        await settle()
        assert [c[1] for c in client.calls if c[0] == "send"] == ["y" * MAX_BODY_BYTES]
    finally:
        await ctrl.stop()
