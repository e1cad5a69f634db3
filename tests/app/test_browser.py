"""``roost app`` in a real browser: two (or three) apps against one real server."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import struct
import wave
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.app.conftest import screenshot

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect
expect.set_options(timeout=20_000)  # as the pages' default timeout (tests/app/conftest.py)

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


def open_chat_with(page: Any, user: str) -> None:
    page.locator("#new-chat-button").click()
    page.locator("#new-chat-user").fill(user)
    page.locator("#new-chat-user").press("Enter")


def ticks(page: Any, text: str) -> Any:
    return page.locator(".msg.own", has_text=text).locator(".tick")


def test_one_to_one_ticks_typing_presence_keyboard_only_phone_and_dark(make_app: Any, open_page: Any) -> None:
    alice_app, bob_app = make_app("alice", "bob")
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
    send(bob, "hi alice, how are you?")
    alice.locator(".msg.in", has_text="how are you").wait_for()
    # typing: bob types, alice's header says so
    bob.locator("#composer-input").press_sequentially("great, and")
    alice.locator("#conv-status[data-typing=true]", has_text="typing…").wait_for()
    screenshot(alice, "conversation")

    # phone width, dark theme: one pane at a time
    phone = open_page(bob_app, dark=True, width=390, height=740)
    expect(phone.locator("#conversation")).to_be_hidden()
    assert phone.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 20, 24)"  # dark --bg
    chat_item(phone, "alice").click()
    expect(phone.locator(".sidebar")).to_be_hidden()
    phone.locator(".msg.in", has_text="hello bob").wait_for()
    screenshot(phone, "conversation-dark-phone")
    phone.get_by_role("button", name="Back to the chat list").click()
    expect(phone.locator(".sidebar")).to_be_visible()
    expect(chat_item(phone, "alice")).to_be_focused()

    # markup from a peer stays text
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    alice.locator("#composer-input").fill(hostile)
    alice.keyboard.press("Enter")
    shown = bob.locator(".msg.in .text", has_text="<b>bold</b>")
    shown.wait_for()
    assert shown.inner_text() == hostile
    assert bob.locator(".msg img, .msg b").count() == 0
    assert bob.evaluate("window.__pwned") is None


def send(page: Any, text: str) -> None:
    page.locator("#composer-input").fill(text)
    page.locator("#composer-input").press("Enter")


def texts(page: Any, selector: str = ".msg .text") -> list[str]:
    return page.locator(f"#messages {selector}").all_inner_texts()


def test_a_group_of_three(make_app: Any, open_page: Any) -> None:
    apps = dict(zip(("alice", "bob", "carol"), make_app("alice", "bob", "carol"), strict=True))
    pages = {user: open_page(app) for user, app in apps.items()}
    alice, carol = pages["alice"], pages["carol"]
    bob = pages["bob"]
    open_chat_with(bob, "carol")
    send(bob, "are you coming on Saturday?")
    alice.locator("#new-group-button").click()
    alice.locator("#new-group-name").fill("Hikers")
    alice.locator("#new-group-members").fill("bob, carol")
    alice.locator("#new-group-name").press("Enter")
    expect(alice.locator("#conv-title")).to_have_text("Hikers")
    expect(alice.locator("#conv-status")).to_have_text("bob, carol, you")
    send(alice, "Saturday at eight?")
    for user in ("bob", "carol"):
        item = chat_item(pages[user], "Hikers")
        item.locator(".badge").filter(has_text="1").wait_for()
        assert item.locator(".chat-preview").inner_text() == "alice: Saturday at eight?"
    expect(carol.locator("#chat-list")).to_contain_text("are you coming")
    chat_item(carol, "bob").locator(".badge").filter(has_text="1").wait_for()
    screenshot(carol, "chat-list")
    # delivered to both: ✓✓; read by bob only: still not blue; by carol too: blue
    ticks(alice, "Saturday").and_(alice.locator("[data-tick=delivered]")).wait_for()
    chat_item(pages["bob"], "Hikers").click()
    pages["bob"].locator(".msg.in", has_text="Saturday").wait_for()
    send(pages["bob"], "Count me in")
    alice.locator(".msg.in", has_text="Count me in").locator(".sender").filter(has_text="bob").wait_for()
    assert ticks(alice, "Saturday").get_attribute("data-tick") == "delivered"
    chat_item(pages["carol"], "Hikers").click()
    ticks(alice, "Saturday").and_(alice.locator("[data-tick=read]")).wait_for()
    # per-member delivered and read times on demand
    alice.locator(".msg.own", has_text="Saturday").get_by_role("button", name="Message info").click()
    info = alice.locator("#info-list")
    for user in ("bob", "carol"):
        row = info.locator(f"li[data-user={user}]")
        row.locator("[data-kind=read] time").wait_for()
        delivered = row.locator("[data-kind=delivered] time").get_attribute("datetime")
        read = row.locator("[data-kind=read] time").get_attribute("datetime")
        assert delivered is not None and read is not None and delivered <= read  # ISO times, same zone
    expect(info.locator("li")).to_have_count(2)  # the other members, not alice
    alice.locator("#info-dialog").get_by_role("button", name="Close").click()
    screenshot(alice, "group")
    # group info: members and admin; remove carol; carol's app learns it
    alice.locator("#group-info-button").click()
    members = alice.locator("#group-members li")
    expect(members).to_have_count(3)
    expect(members.filter(has_text="alice (you)")).to_contain_text("admin")
    alice.get_by_role("button", name="Remove carol").click()
    expect(members).to_have_count(2)
    alice.locator("#group-dialog").get_by_role("button", name="Close").click()
    pages["carol"].locator(".msg.system", has_text="alice removed you").wait_for()
    # bob leaves
    bob.locator("#group-info-button").click()
    bob.locator("#group-leave").click()
    expect(bob.locator("#conv-status")).to_have_text("you left this group")
    alice.locator(".msg.system", has_text="bob left").wait_for()


def test_offline_peer_gets_three_once_in_order_and_restarts_keep_everything(
    make_app: Any, open_page: Any, tmp_path: Any
) -> None:
    alice_app, bob_app = make_app("alice", "bob")
    alice, bob = open_page(alice_app), open_page(bob_app)
    open_chat_with(alice, "bob")
    send(alice, "first")
    chat_item(bob, "alice").click()
    bob.locator(".msg.in", has_text="first").wait_for()
    ticks(alice, "first").and_(alice.locator("[data-tick=read]")).wait_for()

    bob_app.stop()
    for text in ("one", "two", "three"):
        send(alice, text)
    for text in ("one", "two", "three"):  # stored by the server (✓), not delivered
        ticks(alice, text).and_(alice.locator("[data-tick=sent]")).wait_for()

    bob_app = make_app("bob")  # the same state file: a restart
    bob = open_page(bob_app)
    item = chat_item(bob, "alice")
    item.locator(".badge").filter(has_text="3").wait_for()
    assert item.locator(".chat-preview").inner_text() == "three"
    item.click()
    bob.locator(".msg.in", has_text="three").wait_for()
    assert texts(bob) == ["first", "one", "two", "three"]
    ticks(alice, "three").and_(alice.locator("[data-tick=read]")).wait_for()

    # a reload shows the same chats, ticks and (no) unread counts
    alice.reload()
    alice.wait_for_selector("#connection[data-state=connected]")
    chat_item(alice, "bob").locator(".tick[data-tick=read]").wait_for()
    chat_item(alice, "bob").click()
    alice.locator(".msg.own", has_text="three").wait_for()
    assert texts(alice) == ["first", "one", "two", "three"]
    assert alice.locator("#messages .tick[data-tick=read]").count() == 4
    bob.reload()
    bob.wait_for_selector("#connection[data-state=connected]")
    chat_item(bob, "alice").wait_for()
    assert chat_item(bob, "alice").locator(".badge").count() == 0
    assert bob.locator("#me").inner_text() == "you are bob"


def test_messages_written_offline_go_out_on_reconnect_once(
    server: Any, make_app: Any, open_page: Any, tmp_path: Any
) -> None:
    alice_app, bob_app = make_app("alice", "bob")
    alice, bob = open_page(alice_app), open_page(bob_app)
    open_chat_with(alice, "bob")
    send(alice, "before")
    chat_item(bob, "alice").click()
    bob.locator(".msg.in", has_text="before").wait_for()

    server.kill9()
    alice.wait_for_selector("#connection[data-state=reconnecting]")
    send(alice, "while offline 1")
    send(alice, "while offline 2")
    for text in ("while offline 1", "while offline 2"):
        ticks(alice, text).and_(alice.locator("[data-tick=pending]")).wait_for()
    server.start()
    alice.wait_for_selector("#connection[data-state=connected]", timeout=20_000)
    bob.locator(".msg.in", has_text="while offline 2").wait_for(timeout=20_000)
    # once each, in order, on both sides (the page merged its resync with the live events)
    expected = ["before", "while offline 1", "while offline 2"]
    expect(alice.locator("#messages .msg .text")).to_have_text(expected)
    expect(bob.locator("#messages .msg .text")).to_have_text(expected)
    ticks(alice, "while offline 2").and_(alice.locator("[data-tick=read]")).wait_for()
    assert texts(bob) == expected
    assert texts(alice) == expected


def test_roost_send_hands_over_to_the_running_app_and_history_pages_back(
    server: Any, make_app: Any, tokens: Any, open_page: Any
) -> None:
    import subprocess
    import sys

    alice_app, bob_app = make_app("alice", "bob")
    alice = open_page(alice_app)
    command = [sys.executable, "-m", "roost.cli.main", "send", "--url", server.url]
    command += [
        "--token",
        tokens("alice"),
        "--state",
        str(alice_app.state),
        "--to",
        "bob",
        "from the terminal",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr  # handed to the running app: no second connection
    chat_item(alice, "bob").click()
    ticks(alice, "from the terminal").and_(alice.locator("[data-tick=delivered]")).wait_for()
    for i in range(1, 56):
        send(alice, f"note {i}")
    ticks(alice, "note 55").and_(alice.locator("[data-tick=delivered]")).wait_for()

    bob = open_page(bob_app)
    expect(chat_item(bob, "alice").locator(".badge")).to_have_text("56")
    chat_item(bob, "alice").click()
    bob.locator(".msg.in", has_text="note 55").wait_for()
    expect(bob.locator("#messages .msg")).to_have_count(50)  # one page from the local state
    bob.locator("#messages").evaluate("box => { box.scrollTop = 0; }")
    expect(bob.locator("#messages .msg")).to_have_count(56)
    assert texts(bob) == ["from the terminal"] + [f"note {i}" for i in range(1, 56)]
    assert bob.locator("#messages .day").all_inner_texts() == ["Today"]
    # the local search finds it
    bob.locator("#search-input").fill("TERMINAL")
    bob.locator("#search-input").press("Enter")
    bob.locator("#search-list .result-item", has_text="alice: from the terminal").wait_for()


def safety_digits(page: Any) -> str:
    page.locator("#safety-button").click()
    digits = page.locator("#safety-digits span")
    expect(digits).to_have_count(12)
    text = " ".join(digits.all_inner_texts())
    return text


def test_safety_numbers_match_and_a_changed_key_shows_a_banner(
    make_app: Any, open_page: Any, tmp_path: Any
) -> None:
    alice_app, bob_app = make_app("alice", "bob")
    alice, bob = open_page(alice_app), open_page(bob_app)
    open_chat_with(alice, "bob")
    send(alice, "hi bob")
    chat_item(bob, "alice").click()
    bob.locator(".msg.in", has_text="hi bob").wait_for()
    number = safety_digits(alice)
    assert number == safety_digits(bob)  # the same on both sides: no one in between
    assert len(number.replace(" ", "")) == 60
    alice.locator("#safety-verify").click()
    expect(alice.locator("#safety-state")).to_have_text("Verified")
    alice.locator("#safety-dialog").get_by_role("button", name="Close").click()
    expect(alice.locator("#key-banner")).to_be_hidden()

    # bob reinstalls: a new state, so a new identity key
    bob_app.stop()
    for path in tmp_path.glob("bob.sqlite*"):
        path.unlink()
    bob = open_page(make_app("bob"))
    open_chat_with(bob, "alice")
    send(bob, "new phone, same bob")
    alice.locator(".msg.in", has_text="new phone").wait_for()
    banner = alice.locator("#key-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("bob's safety number changed")
    assert safety_digits(alice) != number
    expect(alice.locator("#safety-state")).to_have_text("Not verified")


# A 2x2 red PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a73"
    "0000001649444154789c63f8cfc0f01f0c181818fe03000d8102fd4b4a8e3f0000000049454e44ae426082"
)


def wav(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A real voice note: a 440 Hz tone, 16-bit mono PCM in a WAV file."""
    samples = (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate)))
    frames = b"".join(struct.pack("<h", v) for v in samples)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


RECORD_PROGRESS = """() => {
  // Every value a progress bar of the page shows, as it changes.
  window.__progress = [];
  new MutationObserver(() => {
    for (const bar of document.querySelectorAll("#attach-progress, #messages progress")) {
      if (!bar.hidden && bar.hasAttribute("value")) window.__progress.push([bar.id || "message", bar.value]);
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true });
}"""

DROP = """([name, type, bytes]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, { type }));
  const target = document.getElementById("messages");
  for (const kind of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(kind, { bubbles: true, cancelable: true, dataTransfer: data }));
  }
}"""


RECORD_VIDEO = """async () => {
  // Half a second of a 32x24 canvas, as the browser's own MediaRecorder encodes it.
  const canvas = Object.assign(document.createElement("canvas"), { width: 32, height: 24 });
  const g = canvas.getContext("2d");
  const recorder = new MediaRecorder(canvas.captureStream(10), { mimeType: "video/webm" });
  const chunks = [];
  recorder.ondataavailable = (e) => chunks.push(e.data);
  const done = new Promise((resolve) => (recorder.onstop = resolve));
  recorder.start();
  for (let i = 0; i < 5; i++) {
    g.fillStyle = i % 2 ? "red" : "blue";
    g.fillRect(0, 0, 32, 24);
    await new Promise((r) => setTimeout(r, 100));
  }
  recorder.stop();
  await done;
  return [...new Uint8Array(await new Blob(chunks).arrayBuffer())];
}"""


def wait_until(page: Any, what: Any, script: str) -> Any:
    """Poll ``script`` on ``what`` (a locator) until it is truthy, for up to 20 s; its last value."""
    for _ in range(200):
        value = what.evaluate(script)
        if value:
            return value
        page.wait_for_timeout(100)
    return what.evaluate(script)


def test_files_picked_or_dropped_are_previewed_sent_with_progress_and_shown(
    make_app: Any, open_page: Any
) -> None:
    alice_app, bob_app = make_app("alice", "bob")
    alice, bob = open_page(alice_app), open_page(bob_app)
    open_chat_with(alice, "bob")
    send(alice, "a picture follows")
    alice.evaluate(RECORD_PROGRESS)

    # picked: a preview with a thumbnail, send / cancel; cancel sends nothing
    picked = {"name": "red.png", "mimeType": "image/png", "buffer": PNG}
    alice.locator("#file-input").set_input_files(picked)
    preview = alice.locator("#attach-preview")
    expect(preview).to_be_visible()
    expect(alice.locator("#attach-name")).to_have_text("red.png")
    expect(alice.locator("#attach-details")).to_contain_text("Image")
    assert wait_until(alice, alice.locator("#attach-thumb"), "img => img.complete && img.naturalWidth") == 2
    expect(alice.locator("#attach-send")).to_be_focused()  # keyboard: Enter sends, Esc cancels
    alice.keyboard.press("Escape")
    expect(preview).to_be_hidden()
    assert alice.locator("#messages .msg").count() == 1
    alice.locator("#file-input").set_input_files(picked)
    alice.locator("#attach-send").click()
    expect(preview).to_be_hidden()
    chat_item(bob, "alice").click()
    image = bob.locator(".msg.in img.media")
    image.wait_for()
    assert image.get_attribute("alt") == "red.png"
    # decrypted and served whole
    assert wait_until(bob, image, "img => img.complete && img.naturalWidth") == 2
    alice.locator(".msg.own img.media").wait_for()  # the sender sees it too, once stored
    shown = alice.evaluate("window.__progress")
    assert ["attach-progress", 100] in shown and ["message", 100] in shown, shown

    # dropped: a voice note, played inline from bob's app (which decrypted it)
    note = wav()
    alice.evaluate(DROP, ["note.wav", "audio/wav", list(note)])
    expect(preview).to_be_visible()
    expect(alice.locator("#attach-details")).to_contain_text("Audio")
    alice.keyboard.press("Enter")  # the focused Send button
    player = bob.locator(".msg.in audio")
    player.wait_for()
    seq = bob.locator(".msg.in", has=bob.locator("audio")).get_attribute("data-seq")
    assert player.get_attribute("src") == f"/media/{quote('d:alice:bob')}/{seq}"  # the local app's
    assert player.get_attribute("aria-label") == "Audio: note.wav"
    assert wait_until(bob, player, "a => a.readyState >= 1") is True  # its metadata loaded: a real decode
    assert abs(player.evaluate("a => a.duration") - 0.5) < 0.05
    bob.locator(".msg.in a.download", has_text="note.wav").wait_for()
    served = bob.request.get(bob.url.rstrip("/") + player.get_attribute("src"))
    assert served.body() == note  # decrypted whole, as a player's type, not a download
    assert served.headers["content-type"] == "audio/wav" and "content-disposition" not in served.headers

    # a video, recorded by the browser itself (WebM), plays inline too
    clip = alice.evaluate(RECORD_VIDEO)
    alice.evaluate(DROP, ["clip.webm", "video/webm", clip])
    expect(alice.locator("#attach-details")).to_contain_text("Video")
    alice.locator("#attach-send").click()
    video = bob.locator(".msg.in video")
    video.wait_for()
    assert wait_until(bob, video, "v => v.readyState >= 1 && v.videoWidth") == 32  # decoded: its frame size
    screenshot(bob, "media")

    # any other file is a download, never rendered by the app's origin
    html = b"<script>window.__pwned = 1</script>"
    page_file = {"name": "page.html", "mimeType": "text/html", "buffer": html}
    alice.locator("#file-input").set_input_files(page_file)
    alice.locator("#attach-send").click()
    link = bob.locator(".msg.in a.file-link", has_text="page.html")
    link.wait_for()
    response = bob.request.get(bob.url.rstrip("/") + link.get_attribute("href"))
    assert response.status == 200 and response.body() == html
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment;")


def test_a_file_over_16_mib_goes_through_the_app(make_app: Any, open_page: Any, tmp_path: Path) -> None:
    alice_app, bob_app = make_app("alice", "bob")
    alice, bob = open_page(alice_app), open_page(bob_app)
    open_chat_with(alice, "bob")
    big = tmp_path / "big.bin"
    content = os.urandom(16 * 1024 * 1024 + 4096)
    big.write_bytes(content)
    alice.evaluate(RECORD_PROGRESS)
    alice.locator("#file-input").set_input_files(str(big))
    expect(alice.locator("#attach-details")).to_contain_text("16.0 MB")
    alice.locator("#attach-send").click()
    ticks(alice, "big.bin").and_(alice.locator("[data-tick=delivered]")).wait_for(timeout=60_000)
    shown = alice.evaluate("window.__progress")
    # the bar in the message (the upload to the server, parts of 8 MiB): a partial step, then whole
    uploads = [value for bar, value in shown if bar == "message"]
    assert 100 in uploads and any(0 < v < 100 for v in uploads), shown
    chat_item(bob, "alice").click()
    link = bob.locator(".msg.in a.file-link", has_text="big.bin")
    link.wait_for()
    response = bob.request.get(bob.url.rstrip("/") + link.get_attribute("href"), timeout=60_000)
    assert response.status == 200
    assert hashlib.sha256(response.body()).digest() == hashlib.sha256(content).digest()
