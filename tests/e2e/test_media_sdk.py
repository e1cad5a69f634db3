"""Files through the SDK and the CLI, against a real server and its media store.

Every test sends real encrypted blobs through the server's blob transport
(roost/client/blobs.py) and reads them back; the kill test kills a real client
process with SIGKILL in the middle of an upload."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from roost.client import ATTACHMENT_CT, BlobTampered, Client, InvalidAttachment, Message, RoostError
from roost.client import attachments as att
from roost.client.state import ClientState
from tests.cli_subprocess import REPO, ROOST, run_roost
from tests.e2e.helpers import add_users, close_all, collect, connect, publish_keys

pytestmark = [
    pytest.mark.embedded_only,
    pytest.mark.skipif(
        not hasattr(Client, "upload_blob"),
        reason="the blob transport (roost/client/blobs.py) is not in this tree",
    ),
]


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image  # a dev dependency (through matplotlib); the package does not need it

    out = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(out, "PNG")
    return out.getvalue()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def next_message(client: Client, timeout: float = 30.0) -> Message:
    got = await collect(client, 1, timeout)
    assert got, "no message arrived"
    message: Message = got[0]
    return message


@pytest.fixture
def tokens(server: Any, tmp_path: Path) -> dict[str, str]:
    """alice, bob and carol, each having run a client once on ``NAME.state``:
    their end-to-end keys are on the server, so a message to them goes at once."""
    tokens = add_users(server, ["alice", "bob", "carol"])
    asyncio.run(publish_keys(server, {n: (t, tmp_path / f"{n}.state") for n, t in tokens.items()}))
    return tokens


async def test_image_and_multi_mib_file_one_to_one(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    image = tmp_path / "holiday.png"
    image.write_bytes(png_bytes(320, 200))
    video = random_file(tmp_path / "clip.mp4", 6 * 1024 * 1024 + 123)
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    try:
        progress: list[tuple[int, int]] = []
        sent = await alice.send_file(
            image, to="bob", caption="the beach", progress=lambda d, t: progress.append((d, t))
        )
        assert not isinstance(sent, str) and sent.conv == "d:alice:bob"
        assert progress and progress[-1][0] == progress[-1][1] == att.encrypted_size(image.stat().st_size)
        await alice.send_file(video, to="bob")
        first, second = await next_message(bob), await next_message(bob)
        assert first.ct == second.ct == ATTACHMENT_CT
        ref = att.parse_reference(first.body)
        assert (ref.kind, ref.name, ref.width, ref.height, ref.caption) == (
            "image",
            "holiday.png",
            320,
            200,
            "the beach",
        )
        assert ref.content_type == "image/png" and ref.size == image.stat().st_size
        assert ref.thumbnail is not None and len(ref.thumbnail_bytes() or b"") <= att.MAX_THUMBNAIL_BYTES
        saved = tmp_path / "saved"
        assert (await bob.download(first, saved)).read_bytes() == image.read_bytes()
        path = await bob.download(second, saved)
        assert path.name == "clip.mp4" and sha(path) == sha(video)
        # No overwrite: a second save of the same message gets a new name.
        again = await bob.download(second, saved)
        assert again.name == "clip (1).mp4" and sha(again) == sha(video)
        # The sender can fetch its own attachment back too (another device would).
        own = alice.local_history("d:alice:bob")
        assert (await alice.download(own[0], tmp_path / "own")).read_bytes() == image.read_bytes()
        assert not list((tmp_path / "bob.state.media" / "downloads").iterdir())  # partials cleaned up
        assert not list((tmp_path / "alice.state.media").glob("*.enc"))  # encrypted temps too
    finally:
        await close_all(alice, bob)


async def test_file_to_a_group_of_three(server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    doc = random_file(tmp_path / "report.pdf", 3 * 1024 * 1024 + 5)
    clients = {
        n: await connect(server, tokens[n], tmp_path / f"{n}.state") for n in ("alice", "bob", "carol")
    }
    try:
        group = await clients["alice"].create_group("trip", ["bob", "carol"])
        await clients["alice"].send_file(doc, group=group.group, caption="read this")
        for name in ("bob", "carol"):
            message = await next_message(clients[name])
            assert message.conv == group.group and message.sender == "alice"
            path = await clients[name].download(message, tmp_path / name)
            assert sha(path) == sha(doc)
    finally:
        await close_all(*clients.values())


# A client that starts a file send and then hangs inside the upload (its event
# loop blocked in the progress callback) until the test kills it with SIGKILL.
_HANGING_SENDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from roost.client import Client

    url, token, state, path = sys.argv[1:5]

    async def main():
        client = Client(url, token, state_path=state, serve_local=False)
        def progress(done, total):
            if 0 < done < total:
                print("uploading", done, total, flush=True)
                time.sleep(600)  # blocks the loop: no further byte, no message; killed here
        mid = await client.send_file(path, to="bob", progress=progress, wait=False)
        print("queued", mid, flush=True)
        await client.connect()
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_client_killed_mid_upload_sends_once_after_restart(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    video = random_file(tmp_path / "long.mp4", 24 * 1024 * 1024)
    state = tmp_path / "alice.state"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_SENDER, server.url, tokens["alice"], str(state), str(video)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        queued = proc.stdout.readline().split()
        assert queued[:1] == ["queued"], proc.stderr.read() if proc.poll() is not None else queued
        message_id = queued[1]
        line = proc.stdout.readline().split()
        assert line[:1] == ["uploading"], line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # What the killed client left: the send is in the state, its blob id committed, not yet a message.
    left = ClientState(state)
    try:
        (upload,) = left.uploads()
        assert upload.id == message_id and upload.blob is not None
        assert left.outbox() == []
    finally:
        left.close()
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    alice = await connect(server, tokens["alice"], state)
    try:
        result = await alice.wait_sent(message_id)
        assert result.message_id == message_id
        assert alice.pending_uploads() == [] and alice.pending_outbox() == []
        message = await next_message(bob)
        assert message.id == message_id
        assert att.parse_reference(message.body).blob == upload.blob  # resumed, not started over
        assert sha(await bob.download(message, tmp_path / "bob")) == sha(video)
        # Exactly once: nothing more arrives, and the conversation holds one message.
        assert await collect(bob, 1, 2.0) == []
        page, last = await bob.history("d:alice:bob", limit=10)
        assert [m.id for m in page] == [message_id] and last == 1
    finally:
        await close_all(alice, bob)


def _stored_files(server: Any) -> list[Path]:
    return [p for p in Path(server.data_dir).rglob("*") if p.is_file()]


async def test_tampered_blob_refused_nothing_written(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    doc = random_file(tmp_path / "contract.txt", 200_000)
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    try:
        await alice.send_file(doc, to="bob")
        message = await next_message(bob)
        ref = att.parse_reference(message.body)
        blob_size = att.encrypted_size(doc.stat().st_size)
        # The server's copy of the blob: the one stored file with the blob's exact size.
        (stored,) = [p for p in _stored_files(server) if p.stat().st_size == blob_size]
        data = bytearray(stored.read_bytes())
        assert hashlib.sha256(data).digest() == ref.digest_bytes
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        dest = tmp_path / "dest"
        with pytest.raises(BlobTampered, match="digest"):
            await bob.download(message, dest)
        assert not dest.exists() or list(dest.iterdir()) == []
        # A forged reference whose digest matches the tampered blob: the MAC refuses it.
        forged = att.AttachmentRef(**{**_fields(ref), "digest": att.b64(hashlib.sha256(data).digest())})
        fake = Message(
            message.conv, message.seq, message.id, message.sender, ATTACHMENT_CT, forged.encode(), 0
        )
        with pytest.raises(BlobTampered, match="MAC"):
            await bob.download(fake, dest)
        assert not dest.exists() or list(dest.iterdir()) == []
    finally:
        await close_all(alice, bob)


def _fields(ref: att.AttachmentRef) -> dict[str, Any]:
    return {name: getattr(ref, name) for name in ref.__struct_fields__}


async def test_the_media_store_holds_no_plaintext(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    marker = b"ROOST-PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    doc = tmp_path / "secret.txt"
    doc.write_bytes((marker + b"\n") * 40_000)  # ~1.8 MiB of one recognisable line
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    try:
        await alice.send_file(doc, to="bob")
        message = await next_message(bob)
        assert (await bob.download(message, tmp_path / "bob")).read_bytes() == doc.read_bytes()
    finally:
        await close_all(alice, bob)
    blob_size = att.encrypted_size(doc.stat().st_size)
    files = _stored_files(server)
    assert any(p.stat().st_size == blob_size for p in files), "the blob is not in the data dir"
    for path in files:  # the media store, the database, its WAL, the logs
        assert marker not in path.read_bytes(), f"plaintext found in {path}"


async def test_peer_file_names_cannot_escape_the_save_dir(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    """A sender's client that does not clean its names (a hostile one): the
    receiving SDK saves inside the directory it was given, and never over a file."""
    payload = tmp_path / "payload"
    payload.write_bytes(b"owned\n")
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    try:
        encrypted = att.encrypt_file(payload, tmp_path / "payload.enc")
        blob = await alice.upload_blob(encrypted.path, kind="file")
        names = ["../../escaped.txt", "/etc/passwd", "..\\..\\win.ini", "..", ".bashrc", "a/../../b.txt"]
        for name in names:
            ref = att.AttachmentRef(
                blob=blob,
                key=att.b64(encrypted.key),
                digest=att.b64(encrypted.digest),
                size=encrypted.plain_size,
                content_type="text/plain",
                name=name,
            )
            await alice.send(body=ref.encode(), ct=ATTACHMENT_CT, to="bob")
        dest = tmp_path / "inbox" / "deep"
        saved = [await bob.download(await next_message(bob), dest) for _ in names]
        assert [p.name for p in saved] == [
            "escaped.txt",
            "passwd",
            "win.ini",
            "attachment",
            "bashrc",
            "b.txt",
        ]
        for path in saved:
            assert path.parent == dest and path.read_bytes() == b"owned\n"
        assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "inbox" / "escaped.txt").exists()
    finally:
        await close_all(alice, bob)


async def test_invalid_reference_is_shown_as_invalid_not_a_crash(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    try:
        bad = json.dumps({"blob": "../x", "key": "nope", "name": "a"}).encode()
        await alice.send(body=bad, ct=ATTACHMENT_CT, to="bob")
        await alice.send("still alive", to="bob")
        message = await next_message(bob)
        with pytest.raises(InvalidAttachment):
            await bob.download(message, tmp_path / "dest")
        assert (await next_message(bob)).text == "still alive"
    finally:
        await close_all(alice, bob)


# -- the CLI -------------------------------------------------------------------------


def _cli(server: Any, token: str, state: Path) -> list[str]:
    return ["--url", server.url, "--token", token, "--state", str(state)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}


def test_cli_send_file_and_listen_save_dir(server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes(64, 48))
    big = random_file(tmp_path / "big.bin", 2 * 1024 * 1024 + 1)
    alice = _cli(server, tokens["alice"], tmp_path / "alice.state")
    for args in (("--file", str(photo), "look at this"), ("--file", str(big))):
        out = run_roost("send", *alice, "--to", "bob", *args, env=_env(tmp_path), timeout=120)
        assert out.returncode == 0, out.stderr
        (line,) = out.stdout.splitlines()
        result = json.loads(line)
        assert result["status"] == "sent" and result["conversation"] == "d:alice:bob"
    save_dir = tmp_path / "saved"
    listen = subprocess.run(
        [
            *ROOST,
            "listen",
            *_cli(server, tokens["bob"], tmp_path / "bob.state"),
            "--count",
            "2",
            "--timeout",
            "60",
            "--save-dir",
            str(save_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=_env(tmp_path),
    )
    assert listen.returncode == 0, listen.stderr
    first, second = (json.loads(line) for line in listen.stdout.splitlines())
    assert first["ct"] == ATTACHMENT_CT and first["text"] == "look at this"
    assert first["attachment"]["name"] == "cat.png" and first["attachment"]["width"] == 64
    assert "key" not in first["attachment"]
    assert Path(first["saved"]).read_bytes() == photo.read_bytes()
    assert Path(second["saved"]).parent == save_dir and sha(Path(second["saved"])) == sha(big)


def test_cli_send_file_refusals(server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    alice = _cli(server, tokens["alice"], tmp_path / "alice.state")
    missing = run_roost("send", *alice, "--to", "bob", "--file", str(tmp_path / "nope"), env=_env(tmp_path))
    assert missing.returncode == 2 and "no such file" in missing.stderr and missing.stdout == ""
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    unknown = run_roost("send", *alice, "--to", "nobody", "--file", str(doc), env=_env(tmp_path), timeout=60)
    assert unknown.returncode == 1 and "unknown_user" in unknown.stderr
    # Refused for good: nothing is left to resend by the next client.
    state = ClientState(tmp_path / "alice.state")
    try:
        assert state.outbox() == [] and state.uploads() == []
    finally:
        state.close()


def test_cli_send_file_through_a_running_client(server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    """While ``roost listen`` of alice holds her state, ``roost send --file`` of
    alice hands the file to it (one connection per account); bob saves it."""
    doc = random_file(tmp_path / "notes.bin", 300_000)
    alice = _cli(server, tokens["alice"], tmp_path / "alice.state")
    running = subprocess.Popen(
        [*ROOST, "listen", *alice, "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(tmp_path),
    )  # fmt: skip
    try:
        sock = Path(str(tmp_path / "alice.state") + ".sock")
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        assert sock.exists(), "the running listen did not open its socket"
        out = run_roost("send", *alice, "--to", "bob", "--file", str(doc), "from the running client",
                        env=_env(tmp_path), timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "sent"
    finally:
        running.terminate()
        running.wait(10)
    listen = run_roost(
        "listen", *_cli(server, tokens["bob"], tmp_path / "bob.state"), "--count", "1", "--timeout", "60",
        "--save-dir", str(tmp_path / "bob"), env=_env(tmp_path), timeout=120,
    )  # fmt: skip
    assert listen.returncode == 0, listen.stderr
    line = json.loads(listen.stdout)
    assert line["text"] == "from the running client" and sha(Path(line["saved"])) == sha(doc)


async def test_upload_resumes_after_the_server_is_killed_mid_upload(
    server: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    """The connection is cut (the server killed with SIGKILL and started again on
    its data dir) in the middle of an upload: the same client resumes the same
    blob once it reconnects, and the message goes out once."""
    video = random_file(tmp_path / "movie.mp4", 24 * 1024 * 1024)
    alice = Client(server.url, tokens["alice"], state_path=tmp_path / "alice.state", backoff_cap=0.5)
    await alice.connect()
    bob = await connect(server, tokens["bob"], tmp_path / "bob.state")
    cut = asyncio.Event()
    reports: list[int] = []

    def progress(done: int, total: int) -> None:
        reports.append(done)
        if 0 < done < total and not cut.is_set():
            cut.set()
            server.kill9()  # mid-upload: parts in flight fail, the socket drops

    try:
        message_id = await alice.send_file(video, to="bob", progress=progress, wait=False)
        await asyncio.wait_for(cut.wait(), 60)
        (upload,) = alice.pending_uploads()
        blob = upload.blob
        assert blob is not None
        await asyncio.sleep(2)  # down a while: parts fail, requests wait for the reconnect
        server.start()
        result = await asyncio.wait_for(alice.wait_sent(message_id), 90)
        assert result.message_id == message_id
        message = await next_message(bob, 60)
        assert message.id == message_id and att.parse_reference(message.body).blob == blob
        assert sha(await bob.download(message, tmp_path / "bob")) == sha(video)
        assert await collect(bob, 1, 2.0) == []
        # It went on from the parts the server had, not from zero (a fresh upload would report 0 again).
        assert 0 not in reports[reports.index(next(d for d in reports if d > 0)) :]
    finally:
        await close_all(alice, bob)


async def test_a_file_over_the_limit_is_refused_and_forgotten(make_server: Any, tmp_path: Path) -> None:
    server = make_server("--media-max-file", "1MiB")
    tokens = add_users(server, ["alice", "bob"])
    await publish_keys(server, {"bob": (tokens["bob"], tmp_path / "bob.state")})
    big = random_file(tmp_path / "big.zip", 2 * 1024 * 1024)
    alice = await connect(server, tokens["alice"], tmp_path / "alice.state")
    try:
        with pytest.raises(RoostError) as refused:
            await alice.send_file(big, to="bob")
        assert refused.value.code == "too_large"
        assert alice.pending_uploads() == [] and alice.pending_outbox() == []
        assert alice.state.uploads() == [] and alice.state.outbox() == []
        assert not list(alice.media_folder().glob("*.enc"))
    finally:
        await close_all(alice)
