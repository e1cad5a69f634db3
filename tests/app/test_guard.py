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
            {"op": "send_file", "conv": "g:0011223344556677", "name": "a.txt", "data": "not base64!"},
            {"op": "send_file", "conv": "g:0011223344556677", "name": "a.txt", "data": ""},
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
