"""``roost app`` in a real browser: two (or three) apps against one real server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.app.conftest import screenshot

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

pytestmark = pytest.mark.timeout(90)


def chat_item(page: Any, name: str) -> Any:
    return page.locator(".chat-item", has=page.locator(".chat-name", has_text=re.compile(f"^{name}")))


def new_chat_by_keyboard(page: Any, user: str) -> None:
    """Open a 1:1 chat with ``user`` using only the keyboard: Tab to the button, Enter, type, Enter."""
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "new-chat-button"
    page.keyboard.press("Enter")
    page.keyboard.type(user)
    page.keyboard.press("Enter")
    expect(page.locator("#composer-input")).to_be_focused()


def ticks(page: Any, text: str) -> Any:
    return page.locator(".msg.own", has_text=text).locator(".tick")


def test_one_to_one_ticks_typing_presence_keyboard_only(make_app: Any, open_page: Any) -> None:
    alice_app, bob_app = make_app("alice"), make_app("bob")
    alice, bob = open_page(alice_app), open_page(bob_app)

    new_chat_by_keyboard(alice, "bob")
    alice.keyboard.type("hello bob")
    alice.keyboard.press("Enter")  # keyboard-only send

    # bob's list shows it, unread, with the preview
    item = chat_item(bob, "alice")
    item.locator(".badge").filter(has_text="1").wait_for()
    assert item.locator(".chat-preview").inner_text() == "hello bob"
    # bob's app is running: delivered, not read (✓✓, not blue)
    ticks(alice, "hello bob").and_(alice.locator("[data-tick=delivered]")).wait_for()
    assert ticks(alice, "hello bob").inner_text() == "✓✓"

    item.click()
    bob.locator(".msg.in", has_text="hello bob").wait_for()
    ticks(alice, "hello bob").and_(alice.locator("[data-tick=read]")).wait_for()
    assert item.locator(".badge").count() == 0
    # the ticks on alice's own last message in her chat list follow too
    chat_item(alice, "bob").locator(".tick[data-tick=read]").wait_for()

    # presence: each sees the other online (dot in the list, word in the header)
    alice.locator("#conv-status", has_text="online").wait_for()
    chat_item(alice, "bob").locator(".dot").wait_for()
    # typing: bob types, alice's header says so
    bob.locator("#composer-input").press_sequentially("typing now")
    alice.locator("#conv-status[data-typing=true]", has_text="typing…").wait_for()

    # markup from a peer stays text
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    alice.locator("#composer-input").fill(hostile)
    alice.keyboard.press("Enter")
    shown = bob.locator(".msg.in .text", has_text="<b>bold</b>")
    shown.wait_for()
    assert shown.inner_text() == hostile
    assert bob.locator(".msg img, .msg b").count() == 0
    assert bob.evaluate("window.__pwned") is None

    screenshot(alice, "conversation")
    screenshot(bob, "chat-list")
