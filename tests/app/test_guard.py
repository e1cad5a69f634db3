"""Only this user's browser, with the run's secret, may drive ``roost app``.

Against a real ``roost app`` process: every request without the secret, with
a wrong one, with a foreign Host (DNS rebinding) or a foreign Origin is
refused with 403 and gets nothing.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.app.guard import Guard, cookie_name, new_secret
from roost.app.server import MAX_UPLOAD_BYTES
from tests.app.conftest import AppProcess


def _secret(app: AppProcess) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(app.url).query)["s"][0]


def in_own_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` in a thread of its own: the session's Playwright holds this thread's loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


def test_the_first_load_needs_the_secret_and_sets_a_strict_httponly_cookie(make_app: Any) -> None:
    in_own_loop(first_load(make_app("alice")))


def test_a_foreign_host_or_origin_is_refused_even_with_the_secret(make_app: Any) -> None:
    in_own_loop(foreign_host_or_origin(make_app("alice")))


async def first_load(app: AppProcess) -> None:
    secret = _secret(app)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for path in ("/", "/?s=", "/?s=" + secret[:-1] + "x", "/static/app.js", f"/static/app.js?s={secret}"):
            async with http.get(app.origin + path) as resp:
                assert resp.status == 403, path
                assert "secret" in await resp.text()
        async with http.get(app.url) as resp:
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
            assert cookie.startswith(f"{cookie_name(app.port)}={secret};")
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        jar = {cookie_name(app.port): secret}
        async with http.get(app.origin + "/static/app.js", cookies=jar) as resp:
            assert resp.status == 200
        async with http.get(app.origin + "/static/app.js", cookies={cookie_name(app.port): "nope"}) as resp:
            assert resp.status == 403


async def foreign_host_or_origin(app: AppProcess) -> None:
    secret = _secret(app)
    ws_url = f"ws://127.0.0.1:{app.port}/ws"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host.
        async with http.get(app.url, headers={"Host": f"evil.example:{app.port}"}) as resp:
            assert resp.status == 403
            assert "Host" in await resp.text()
        for headers in (
            {},
            {"Origin": "http://evil.example"},
            {"Origin": f"http://127.0.0.1:{app.port + 1}"},
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(
                    ws_url, headers={**headers, "Cookie": f"{cookie_name(app.port)}={secret}"}
                )
            assert refused.value.status == 403, headers
        # the query secret opens the page only, never the socket
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(ws_url + f"?s={secret}", headers={"Origin": app.origin})
        cookie = f"{cookie_name(app.port)}={secret}"
        async with http.ws_connect(ws_url, headers={"Origin": app.origin, "Cookie": cookie}) as ws:
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "snapshot"


def test_a_page_without_the_secret_shows_nothing(make_app: Any, browser: Any) -> None:
    app = make_app("alice")
    context = browser.new_context()
    try:
        page = context.new_page()
        response = page.goto(app.origin + "/")
        assert response is not None and response.status == 403
        assert page.locator("#chat-list").count() == 0
    finally:
        context.close()


@given(st.text(max_size=60))
def test_only_the_secret_itself_passes(candidate: str) -> None:
    secret = new_secret()
    guard = Guard(secret, 4321)
    host = "127.0.0.1:4321"
    allowed = guard.refusal(
        host=host, origin=None, cookies={guard.cookie: candidate}, query_secret=None, websocket=False
    )
    assert (allowed is None) == (candidate == secret)
    assert len(secret) >= 22  # 128 bits or more, base64
    assert (
        guard.refusal(
            host=host, origin=None, cookies={guard.cookie: secret}, query_secret=None, websocket=False
        )
        is None
    )


def test_bad_commands_get_an_error_reply_and_change_nothing(make_app: Any) -> None:
    in_own_loop(bad_commands(make_app("alice")))


async def bad_commands(app: AppProcess) -> None:
    cookie = f"{cookie_name(app.port)}={_secret(app)}"
    headers = {"Origin": app.origin, "Cookie": cookie}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.ws_connect(f"ws://127.0.0.1:{app.port}/ws", headers=headers) as ws,
    ):
        assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
        bad: list[Any] = [
            "not json",
            "[1, 2]",
            {"op": "no such op"},
            {"op": "send", "conv": 5, "text": "x"},
            {"op": "send", "conv": "d:bob:carol", "text": "not my chat"},
            {"op": "send", "conv": "../etc", "text": "x"},
            {"op": "send", "conv": "g:0011223344556677", "text": ""},
            {"op": "send", "conv": "g:0011223344556677", "text": "x" * 70_000},
            {"op": "read", "conv": "g:0011223344556677", "seq": "7"},
            {"op": "read", "conv": "g:0011223344556677", "seq": True},
            {"op": "history", "conv": "g:0011223344556677", "before": "x"},
            {"op": "new_chat", "user": "<script>"},
            {"op": "new_group", "name": "", "members": []},
            {"op": "group_add", "conv": "d:alice:bob", "members": ["carol"]},
            {"op": "group_add", "conv": "g:0011223344556677", "members": "carol"},
            {"op": "search", "text": 3},
            {"op": "receipts", "conv": "g:0011223344556677", "seq": 0},
        ]
        for i, command in enumerate(bad):
            if isinstance(command, dict):
                await ws.send_json({**command, "ref": str(i)})
            else:
                await ws.send_str(command)
            reply = await _reply(ws)
            assert reply["ok"] is False and reply["error"], (command, reply)
        # nothing was queued, and the app still answers
        await ws.send_json({"op": "history", "conv": "g:0011223344556677", "ref": "last"})
        reply = await _reply(ws)
        assert reply["ok"] is True and reply["messages"] == []
        await ws.send_json({"op": "snapshot", "ref": "snap"})
        reply = await _reply(ws)
        assert reply["snapshot"]["chats"] == []


async def _reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:  # skip live events (connection state) until the reply
        event = await ws.receive_json(timeout=10)
        if event["type"] == "reply":
            return event  # type: ignore[no-any-return]


def test_a_refused_token_shows_offline_and_the_page_still_answers(
    server: Any, tmp_path: Any, open_page: Any, browser: Any
) -> None:
    app = AppProcess(server.url, "rt_not_a_token", tmp_path / "nobody.sqlite").start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(app.url)
        page.wait_for_selector("#connection[data-state=offline]", timeout=20_000)
        assert "token" in (page.locator("#connection").get_attribute("title") or "")
        page.locator("#new-chat-button").click()
        page.locator("#new-chat-user").fill("bob")
        page.locator("#new-chat-user").press("Enter")
        page.locator("#new-chat-error", has_text="not connected").wait_for()
        context.close()
    finally:
        app.stop()


def test_the_upload_route_needs_the_secret_and_the_apps_origin(make_app: Any) -> None:
    in_own_loop(uploads(make_app("alice")))


async def uploads(app: AppProcess) -> None:
    secret = _secret(app)
    cookie = f"{cookie_name(app.port)}={secret}"
    url = app.origin + "/upload?conv=d:alice:bob&name=note.txt"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        refused: list[tuple[dict[str, str], str, str]] = [
            ({"Origin": app.origin}, url, "secret"),  # no cookie
            ({"Origin": app.origin, "Cookie": f"{cookie_name(app.port)}=nope"}, url, "secret"),
            ({"Origin": app.origin}, url + f"&s={secret}", "secret"),  # the query secret opens the page only
            ({"Cookie": cookie}, url, "Origin"),  # a POST must say where it comes from
            ({"Cookie": cookie, "Origin": "http://evil.example"}, url, "Origin"),
            ({"Cookie": cookie, "Origin": app.origin, "Host": f"evil.example:{app.port}"}, url, "Host"),
        ]
        for headers, target, why in refused:
            async with http.post(target, data=b"hello", headers=headers) as resp:
                assert resp.status == 403, headers
                assert why in await resp.text()
        ok_headers = {"Cookie": cookie, "Origin": app.origin}
        bad = [
            (app.origin + "/upload?conv=../etc&name=a.txt", b"x", 400),
            (app.origin + "/upload?name=a.txt", b"x", 400),
            (app.origin + "/upload?conv=d:bob:carol&name=a.txt", b"x", 400),  # not a chat of alice's
            (url, b"", 400),
        ]
        for target, body, status in bad:
            async with http.post(target, data=body, headers=ok_headers) as resp:
                assert resp.status == status, target
                assert (await resp.json())["ok"] is False
        assert await _too_large_refused(app, cookie)
        # nothing was queued or left behind
        async with http.ws_connect(f"ws://127.0.0.1:{app.port}/ws", headers=ok_headers) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            await ws.send_json({"op": "snapshot", "ref": "snap"})
            assert (await _reply(ws))["snapshot"]["chats"] == []
        outgoing = app.state.with_name(app.state.name + ".media") / "app-outgoing"
        assert not outgoing.exists() or not any(outgoing.iterdir())
        # with both, the file is taken: a pending own message in the chat with bob
        async with http.post(url, data=b"hello", headers=ok_headers) as resp:
            assert resp.status == 200
            message = (await resp.json())["message"]
        assert message["conv"] == "d:alice:bob" and message["seq"] is None
        assert message["attachment"]["name"] == "note.txt" and message["attachment"]["size"] == 5


async def _too_large_refused(app: AppProcess, cookie: str) -> bool:
    """A body announced over the limit is refused before a byte of it is read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        head = (
            f"POST /upload?conv=d:alice:bob&name=big.bin HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
            f"Origin: {app.origin}\r\nCookie: {cookie}\r\nContent-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        return status.split()[1] == b"413"
    finally:
        writer.close()
