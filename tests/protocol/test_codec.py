"""The codec: bytes -> exactly one typed client frame, or a typed ProtocolError."""

from __future__ import annotations

import base64
import json
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.protocol import frames as f
from roost.protocol.codec import decode_client, decode_server, encode
from roost.protocol.errors import ErrorCode, ProtocolError

CLIENT_TYPES = typing.get_args(f.ClientFrame)

SAMPLES: list[f.Frame] = [
    f.Auth(token="tok-123", v=f.PROTOCOL_VERSION),
    f.Send(id="m-1", body=b"\x00hello\xff", ct="application/octet-stream", to="bob"),
    f.Send(id="m-2", body=b"", conv="g:0123456789abcdef"),
    f.DeliveryAck(conv="d:alice:bob", seq=42),
    f.ReadMarker(conv="d:alice:bob", seq=7),
    f.ReceiptAck(conv="g:0123456789abcdef", rv=3),
    f.PresenceSubscribe(users=["alice", "bob.b", "c-3_x"]),
    f.PresenceUnsubscribe(users=["alice"]),
    f.Typing(conv="d:alice:bob", active=False),
    f.GroupCreate(name="Friends 🎉", members=["bob", "carol"], ref="r1"),
    f.GroupAdd(group="g:0123456789abcdef", members=["dave"], ref="r2"),
    f.GroupRemove(group="g:0123456789abcdef", members=["dave"], ref="r3"),
    f.GroupLeave(group="g:0123456789abcdef", ref="r4"),
    f.GroupInfo(group="g:0123456789abcdef", ref="r5"),
    f.HistoryRequest(conv="d:alice:bob", before=100, limit=200, ref="r6"),
    f.HistoryRequest(conv="d:alice:bob", after=0, limit=1),
    f.SyncRequest(),
    f.Ping(t=123456789),
    f.KeysPut(
        registration=16380,
        identity=b"\x05" + b"i" * 32,
        signed=f.SignedPreKey(id=1, key=b"\x05" + b"s" * 32, sig=b"g" * 64),
        prekeys=[f.PreKey(id=2**24 - 1, key=b"\x05" + b"p" * 32)],
        kem_prekeys=[f.KemPreKey(id=3, key=b"\x08" + b"k" * 1568, sig=b"g" * 64)],
        last_resort=f.KemPreKey(id=4, key=b"\x08" + b"l" * 1568, sig=b"g" * 64),
        ref="k1",
    ),
    f.KeysCount(ref="k2"),
    f.KeysGet(user="alice", ref="k3"),
    f.BlobNew(size=5 * 2**20, kind="video", ref="b1"),
    f.BlobPutUrls(blob="0123456789abcdef0123456789abcdef", parts=[1, 2, 3], ref="b2"),
    f.BlobStatus(blob="0123456789abcdef0123456789abcdef", ref="b3"),
    f.BlobComplete(blob="0123456789abcdef0123456789abcdef", parts=[(1, "e1"), (2, '"e2"')], ref="b4"),
    f.BlobGet(blob="0123456789abcdef0123456789abcdef", ref="b5"),
]

BLOB = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "blob_new", "size": 0, "kind": "file"},
        {"type": "blob_new", "size": 2**41, "kind": "file"},
        {"type": "blob_new", "size": 10, "kind": "sticker"},
        {"type": "blob_put_urls", "blob": BLOB, "parts": []},
        {"type": "blob_put_urls", "blob": BLOB, "parts": list(range(1, 102))},
        {"type": "blob_put_urls", "blob": BLOB, "parts": [0]},
        {"type": "blob_put_urls", "blob": BLOB.upper(), "parts": [1]},
        {"type": "blob_status", "blob": "../../etc/passwd"},
        {"type": "blob_get", "blob": BLOB + "00"},
        {"type": "blob_complete", "blob": BLOB, "parts": [[1]]},
        {"type": "blob_complete", "blob": BLOB, "parts": [[1, ""]]},
        {"type": "blob_complete", "blob": BLOB, "parts": [[1001, "e"]]},
    ],
)
def test_blob_frames_out_of_their_limits_are_bad_frames(frame: dict[str, typing.Any]) -> None:
    assert decode_error(msgspec.json.encode(frame)).code == ErrorCode.BAD_FRAME


def decode_error(data: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client(data)
    return info.value


def test_samples_cover_every_client_frame_type() -> None:
    assert {type(s) for s in SAMPLES} == set(CLIENT_TYPES)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda fr: type(fr).__name__)
def test_every_client_frame_round_trips(frame: f.Frame) -> None:
    data = encode(frame)
    decoded = decode_client(data)
    assert type(decoded) is type(frame)
    assert decoded == frame
    # and the same from a text frame
    assert decode_client(data.decode()) == frame
    # the wire form names the type
    assert json.loads(data)["type"] == frame.__struct_config__.tag


def test_defaults_are_filled_in() -> None:
    frame = decode_client(b'{"type":"send","id":"x","body":"aGk=","to":"bob"}')
    assert frame == f.Send(id="x", body=b"hi", to="bob")
    assert frame.ct == f.E2EE_CT  # the only content type a server accepts
    assert frame.conv is None
    hist = decode_client(b'{"type":"history","conv":"d:a:b"}')
    assert isinstance(hist, f.HistoryRequest)
    assert (hist.limit, hist.before, hist.after, hist.ref) == (50, None, None, "")


def test_unknown_fields_are_ignored() -> None:
    assert decode_client(b'{"type":"ping","t":5,"future_field":[1,{"a":2}]}') == f.Ping(t=5)


def test_server_frames_round_trip_through_decode_server() -> None:
    frames = [
        f.Welcome(user="alice", v=1, heartbeat=30),
        f.SendAck(id="m", conv="d:a:b", seq=3, ts=9, duplicate=True),
        f.Deliver(conv="d:a:b", seq=3, id="m", sender="a", ct="text/plain", body=b"\x01", ts=9),
        f.Receipt(conv="d:a:b", rv=2, marks={"b": f.MemberMarks(3, 1)}, all_delivered=3, all_read=1),
        f.Error(code="bad_frame", message="nope", ref="m"),
        f.KeysState(ec=3, kem=0, has_identity=True, ref="k"),
        f.KeysBundle(
            user="alice",
            identity=b"\x05" + b"i" * 32,
            devices=[
                f.DeviceKeys(
                    device=1,
                    registration=1,
                    signed=f.SignedPreKey(id=1, key=b"\x05" + b"s" * 32, sig=b"g" * 64),
                    prekey=None,
                    kem=f.KemPreKey(id=4, key=b"\x08" + b"l" * 1568, sig=b"g" * 64),
                    kem_last_resort=True,
                )
            ],
            ref="k",
        ),
        f.KeysLow(device=1, ec=9, kem=0),
    ]
    for frame in frames:
        assert decode_server(encode(frame)) == frame


# -- malformed input --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"{", b"", b"not json", b'{"type":"ping",}', b"\xff\xfe\x00", "{'type': 'ping'}"],
)
def test_malformed_json_is_bad_frame(data: bytes | str) -> None:
    err = decode_error(data)
    assert err.code is ErrorCode.BAD_FRAME
    assert err.ref == ""


@pytest.mark.parametrize("data", [b"[]", b"1", b'"ping"', b"null", b"{}", b'{"type":5}', b'{"t":1}'])
def test_json_that_is_not_a_frame_object_is_bad_frame(data: bytes) -> None:
    assert decode_error(data).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("kind", ["nope", "welcome", "msg", "pong", "error", "PING", ""])
def test_unknown_type(kind: str) -> None:
    err = decode_error(json.dumps({"type": kind, "id": "abc"}))
    if kind == "":
        # an empty type is treated like a missing one
        assert err.code is ErrorCode.BAD_FRAME
    else:
        # server frame types are not valid from a client either
        assert err.code is ErrorCode.UNKNOWN_TYPE
        assert err.ref == "abc"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "ping", "t": "soon"},
        {"type": "dack", "conv": "d:a:b", "seq": "1"},
        {"type": "dack", "conv": "d:a:b", "seq": -1},
        {"type": "dack", "conv": "d:a:b", "seq": 2**53 + 1},
        {"type": "dack", "conv": "d:a:b"},
        {"type": "dack", "conv": 5, "seq": 1},
        {"type": "dack", "conv": "ab", "seq": 1},
        {"type": "send", "id": "m", "body": "!!notbase64", "to": "bob"},
        {"type": "send", "id": "m", "body": "", "to": "Bob"},
        {"type": "send", "id": "", "body": "", "to": "bob"},
        {"type": "send", "id": "m" * 65, "body": "", "to": "bob"},
        {"type": "send", "id": "m", "body": 12, "to": "bob"},
        {"type": "auth", "token": ""},
        {"type": "auth"},
        {"type": "typing", "conv": "d:a:b", "active": "yes"},
        {"type": "presence_sub", "users": "alice"},
        {"type": "presence_sub", "users": ["ok", "NOT OK"]},
        {"type": "presence_sub", "users": [f"u{i}" for i in range(f.MAX_PRESENCE_USERS + 1)]},
        {"type": "group_create", "name": "", "members": []},
        {"type": "group_create", "name": "x" * (f.MAX_GROUP_NAME + 1), "members": []},
        {"type": "history", "conv": "d:a:b", "limit": 0},
        {"type": "history", "conv": "d:a:b", "limit": f.MAX_HISTORY_PAGE + 1},
        {"type": "ping", "t": 1.5},
    ],
)
def test_wrong_field_types_and_values_are_bad_frame(obj: dict[str, typing.Any]) -> None:
    err = decode_error(json.dumps(obj))
    assert err.code is ErrorCode.BAD_FRAME, err.message
    assert err.message


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "send", "id": "m", "body": "", "to": "bob\n"},
        {"type": "presence_sub", "users": ["bob\n"]},
        {"type": "group_create", "name": "g", "members": ["bob\n"]},
    ],
)
def test_user_name_with_trailing_newline_is_bad_frame(obj: dict[str, typing.Any]) -> None:
    """The UserName pattern ends in ``$``, which also matches before a final newline."""
    assert decode_error(json.dumps(obj)).code is ErrorCode.BAD_FRAME


def test_body_over_the_wire_limit_is_too_large() -> None:
    # exactly the limit (64 KiB of plaintext plus the encryption's 8 KiB) is fine
    ok = f.Send(id="big", body=b"x" * f.MAX_WIRE_BODY_BYTES, to="bob")
    data = encode(ok)
    assert len(data) <= f.MAX_FRAME_BYTES
    assert decode_client(data) == ok
    # one byte more is too large, and the error names the message
    over = encode(f.Send(id="big", body=b"x" * (f.MAX_WIRE_BODY_BYTES + 1), to="bob"))
    assert len(over) <= f.MAX_FRAME_BYTES  # so it is the body check that fires
    err = decode_error(over)
    assert err.code is ErrorCode.TOO_LARGE
    assert err.ref == "big"


def test_frame_over_max_frame_bytes_is_too_large() -> None:
    padded = b'{"type":"ping","t":1,"pad":"' + b"x" * f.MAX_FRAME_BYTES + b'"}'
    err = decode_error(padded)
    assert err.code is ErrorCode.TOO_LARGE
    # even otherwise valid JSON padded with whitespace
    err = decode_error(b'{"type":"ping"}' + b" " * f.MAX_FRAME_BYTES)
    assert err.code is ErrorCode.TOO_LARGE
    # the limit itself is allowed
    body = b'{"type":"ping","pad":""}'
    exact = body[:-2] + b"x" * (f.MAX_FRAME_BYTES - len(body)) + b'"}'
    assert len(exact) == f.MAX_FRAME_BYTES
    assert decode_client(exact) == f.Ping()


def test_text_frame_over_max_frame_bytes_in_utf8_is_too_large() -> None:
    """The limit is in bytes: a text frame of multi-byte characters that is over
    MAX_FRAME_BYTES once UTF-8 encoded must be refused like the same bytes are."""
    text = '{"type":"ping","pad":"' + "é" * (f.MAX_FRAME_BYTES // 2 + 10) + '"}'
    assert len(text) < f.MAX_FRAME_BYTES < len(text.encode())
    assert decode_error(text.encode()).code is ErrorCode.TOO_LARGE
    assert decode_error(text).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize("depth", [1_000, 5_000, 50_000])
def test_deeply_nested_json_is_bad_frame_not_recursion_error(depth: int) -> None:
    """Small frames of deeply nested arrays must be refused with a ProtocolError."""
    nested = "[" * depth + "]" * depth
    for data in (nested, '{"type":"ping","x":' + nested + "}", "[" * depth):
        assert len(data) <= f.MAX_FRAME_BYTES
        err = decode_error(data)
        assert err.code is ErrorCode.BAD_FRAME


# -- ref / id echo ------------------------------------------------------------


def test_error_echoes_ref() -> None:
    err = decode_error(json.dumps({"type": "history", "conv": "d:a:b", "limit": 0, "ref": "h-9"}))
    assert (err.code, err.ref) == (ErrorCode.BAD_FRAME, "h-9")


def test_error_echoes_id() -> None:
    err = decode_error(json.dumps({"type": "send", "id": "m-77", "body": "", "to": "Nope!"}))
    assert (err.code, err.ref) == (ErrorCode.BAD_FRAME, "m-77")


def test_ref_is_preferred_to_id_and_overlong_or_non_string_values_are_not_echoed() -> None:
    both = decode_error(json.dumps({"type": "zzz", "id": "the-id", "ref": "the-ref"}))
    assert both.ref == "the-ref"
    long_ref = decode_error(json.dumps({"type": "zzz", "id": "short", "ref": "r" * 65}))
    assert long_ref.ref == "short"
    too_long = decode_error(json.dumps({"type": "zzz", "id": "i" * 65}))
    assert too_long.ref == ""
    not_str = decode_error(json.dumps({"type": "zzz", "id": 12345}))
    assert not_str.ref == ""


def test_no_ref_when_frame_has_none() -> None:
    assert decode_error(b'{"type":"dack","conv":"d:a:b","seq":"x"}').ref == ""


# -- properties ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

FIELD_NAMES = [
    "type", "id", "ref", "conv", "seq", "rv", "body", "ct", "to", "token", "v", "users",
    "members", "name", "group", "before", "after", "limit", "t", "active",
    "size", "kind", "blob", "parts",
]  # fmt: skip

TAGS = [t.__struct_config__.tag for t in CLIENT_TYPES] + ["welcome", "msg", "x"]


@st.composite
def frame_like(draw: st.DrawFn) -> dict[str, typing.Any]:
    obj = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6))
    if draw(st.booleans()):
        obj["type"] = draw(st.sampled_from(TAGS))
    if draw(st.booleans()):
        obj["body"] = base64.b64encode(draw(st.binary(max_size=32))).decode()
    return obj


def check_only_protocol_errors(data: bytes | str) -> None:
    try:
        frame = decode_client(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert isinstance(exc.ref, str) and len(exc.ref) <= 64
        assert exc.code in (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE, ErrorCode.TOO_LARGE)
    else:
        assert isinstance(frame, CLIENT_TYPES)
        # whatever decodes re-encodes to something that decodes to the same frame
        assert decode_client(encode(frame)) == frame


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    check_only_protocol_errors(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_only_raises_protocol_error(value: typing.Any) -> None:
    data = msgspec.json.encode(value)
    check_only_protocol_errors(data)
    check_only_protocol_errors(data.decode())


@settings(max_examples=200, deadline=None)
@given(frame_like())
def test_frame_shaped_json_only_raises_protocol_error(obj: dict[str, typing.Any]) -> None:
    check_only_protocol_errors(msgspec.json.encode(obj))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    check_only_protocol_errors(text)


# -- the key directory's frames -----------------------------------------------


def _keys_put(kem: int) -> bytes:
    sig = base64.b64encode(b"g" * 64).decode()
    kem_key = base64.b64encode(b"\x08" + b"k" * 1568).decode()
    ec_key = base64.b64encode(b"\x05" + b"e" * 32).decode()
    return json.dumps(
        {
            "type": "keys_put",
            "registration": 1,
            "identity": ec_key,
            "signed": {"id": 1, "key": ec_key, "sig": sig},
            "prekeys": [{"id": i, "key": ec_key} for i in range(1, 101)],
            "kem_prekeys": [{"id": i, "key": kem_key, "sig": sig} for i in range(1, kem + 1)],
        }
    ).encode()


def test_only_a_keys_put_may_exceed_the_common_frame_limit() -> None:
    full = _keys_put(100)  # 100 one-time keys of each kind
    assert f.MAX_FRAME_BYTES < len(full) <= f.MAX_KEYS_FRAME_BYTES
    assert isinstance(decode_client(full), f.KeysPut)
    assert isinstance(decode_client(full.decode()), f.KeysPut)
    other = json.dumps({"type": "ping", "pad": "x" * (f.MAX_FRAME_BYTES + 10)}).encode()
    assert decode_error(other).code is ErrorCode.TOO_LARGE
    over = full[:-1] + b', "pad": "' + b"x" * f.MAX_KEYS_FRAME_BYTES + b'"}'
    assert decode_error(over).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        (["identity"], b"\x05" * 32, ErrorCode.BAD_KEY),
        (["signed", "key"], b"\x05" * 34, ErrorCode.BAD_KEY),
        (["signed", "sig"], b"g" * 63, ErrorCode.BAD_SIGNATURE),
        (["signed", "id"], 0, ErrorCode.BAD_KEY),
        (["prekeys", 3, "key"], b"\x05" * 32, ErrorCode.BAD_KEY),
        (["prekeys", 3, "id"], 2**24, ErrorCode.BAD_KEY),
        (["kem_prekeys", 0, "key"], b"\x08" * 1570, ErrorCode.BAD_KEY),
        (["kem_prekeys", 0, "sig"], b"", ErrorCode.BAD_SIGNATURE),
        (["last_resort"], {"id": 1, "key": "AA==", "sig": "AA=="}, ErrorCode.BAD_KEY),
        (["registration"], 16381, ErrorCode.BAD_FRAME),
        (["device"], 2, ErrorCode.BAD_FRAME),
    ],
)
def test_a_keys_put_the_decoder_refuses_gets_a_typed_code(path: list, value: object, code: ErrorCode) -> None:
    frame = json.loads(_keys_put(1))
    frame["ref"] = "r"
    target = frame
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    err = decode_error(json.dumps(frame))
    assert (err.code, err.ref) == (code, "r")


def test_too_many_one_time_keys_in_one_frame_is_too_many_keys() -> None:
    frame = json.loads(_keys_put(1))
    frame["prekeys"].append(frame["prekeys"][0])
    assert len(frame["prekeys"]) == f.MAX_KEYS_PER_FRAME + 1
    assert decode_error(json.dumps(frame)).code is ErrorCode.TOO_MANY_KEYS
