"""PostgreSQL store for cluster mode: many gateway processes, one database.

Same contract and semantics as ``SqliteStore`` (``roost/store/base.py``),
built for many writers:

* **Group commit, one round trip per batch.** Writes are queued when called;
  one batching task per process takes everything queued (up to ``max_batch``)
  and sends it as ONE pipeline: ``Connection.fetchmany`` binds and executes the
  statement ``SELECT * FROM roost_op(...)`` once per operation and ends with a
  single Sync. Outside an explicit transaction block PostgreSQL runs such a
  pipeline as one implicit transaction and commits it at the Sync, so a batch
  costs one network round trip and one WAL flush whatever its size. Futures
  are resolved only after that commit returned.
* **The logic runs in PL/pgSQL** (created by the migration): membership
  checks, the idempotency lookup, seq allocation with
  ``UPDATE conversations SET last_seq = last_seq + 1 ... RETURNING`` (row
  lock held until commit, in the same transaction as the insert), receipts.
  A refusal is a result row, not an SQL error, so it does not abort the batch.
* **Many processes.** A batch first locks the conversation rows it appends to
  in id order (one more execution in the same pipeline), so two gateways'
  batches queue behind each other instead of deadlocking; deadlocks and
  serialization failures that still happen roll the batch back and retry it.
  The unique index on (conv, sender, client_id) backs idempotency. The only
  in-process cache (recipients per conversation) is tagged with the
  conversation's membership ``epoch`` and checked under the row lock, so it
  is never authoritative.
* **Failures.** A lost connection, a restart of PostgreSQL or any other
  storage error fails every future of the batch with ``StoreUnavailable`` and
  breaks their ``SendStream``s; nothing is answered with a result unless its
  commit returned. The pool replaces dead connections, so the next batch
  reconnects by itself.

Every table carries its shard key (conversation for ``conversations``,
``members`` and ``messages``; user for ``users``, ``receipt_pending``,
``receipt_marks`` and the key directory's tables) and
every unique index includes it, so the tables could be distributed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from roost.core.delivery import DrainRequest
from roost.core.ids import direct_conv_id, direct_members
from roost.core.membership import MEMBER, Member
from roost.core.membership import require_active as _require_active
from roost.core.metrics import Metrics
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.protocol.frames import MEMBERSHIP_CT, SYSTEM_SENDER
from roost.store import blobmeta, postgres_keys
from roost.store.base import (
    NO_KEYS,
    REMOVED,
    Account,
    ConnectState,
    DeviceKeys,
    DrainPage,
    GroupSnapshot,
    InboxEntry,
    KeyStock,
    KeyUpload,
    MarkResult,
    ReceiptState,
    SendStream,
    StoredMessage,
    StoreUnavailable,
    no_connect_state,
    removed_token,
)
from roost.store.pass_batch import PassBatcher
from roost.store.sqlite import HISTORY_PAGE_BYTES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7  # 6: the key directory (roost/store/postgres_keys.py); 7: blobs (roost/store/blobmeta.py)
TOKEN_BATCH = 512  # token lookups per query at most
USER_BATCH = 256  # connect-time inbox / pending-receipt / key-stock reads per query at most
# pg_advisory_xact_lock key serializing concurrent migrations ("roost" in ASCII).
MIGRATION_LOCK = 0x726F6F7374

# A folded ack was refused: roll the batch back and run it again unfolded.
REFOLD_SQLSTATE = "RX001"
RETRY_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS roost_schema (
    id integer PRIMARY KEY CHECK (id = 1),
    version integer NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now()
);
"""

# Text keys use the "C" collation: byte order, the same order as Python's
# sorted(), whatever the database's default locale.
# The members whose marks changed in a sender's pending receipts, with the rv
# of the last change: every live receipt carries them all again until an ack
# covers that rv, since an ack of a later receipt cannot tell whether an
# earlier one (that alone carried a mark) arrived. Their current marks come
# back in the mk_* fields of roost_receipts()' answer. And a receipt_pending
# row stays once acked (pending while rv > acked), so rv never starts again
# at 1 and a late ack of an old receipt cannot clear a new one. Schema 5.
_RECEIPT_MARKS = """
ALTER TABLE receipt_pending ADD COLUMN IF NOT EXISTS acked bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS receipt_marks (
    user_name text COLLATE "C" NOT NULL,
    conv text COLLATE "C" NOT NULL,
    member text COLLATE "C" NOT NULL,
    rv bigint NOT NULL,
    PRIMARY KEY (user_name, conv, member)
);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attname = 'mk_targets' AND attrelid = (
                   SELECT typrelid FROM pg_type WHERE typname = 'roost_result'
                   AND typnamespace = current_schema()::regnamespace)) THEN
        ALTER TYPE roost_result ADD ATTRIBUTE mk_targets text[], ADD ATTRIBUTE mk_convs text[],
            ADD ATTRIBUTE mk_members text[], ADD ATTRIBUTE mk_ds bigint[], ADD ATTRIBUTE mk_rs bigint[];
    END IF;
END $$;
"""

_TABLES = """
CREATE TABLE IF NOT EXISTS users (
    name text COLLATE "C" PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    created bigint NOT NULL,
    last_seen bigint
);
-- last_seq is bumped by every message: leave room for HOT updates.
CREATE TABLE IF NOT EXISTS conversations (
    id text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL,                  -- 'direct' | 'group'
    name text NOT NULL DEFAULT '',
    last_seq bigint NOT NULL DEFAULT 0,
    epoch bigint NOT NULL DEFAULT 0,     -- bumped by every change of the active members
    created bigint NOT NULL
) WITH (fillfactor = 50);
-- One row per (conversation, user): membership and the receipt/inbox marks.
CREATE TABLE IF NOT EXISTS members (
    conv text COLLATE "C" NOT NULL,
    user_name text COLLATE "C" NOT NULL,
    role text NOT NULL,
    joined_seq bigint NOT NULL,
    left_seq bigint,
    delivered bigint NOT NULL,
    read bigint NOT NULL,
    PRIMARY KEY (conv, user_name)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS members_by_user ON members (user_name, conv);
CREATE TABLE IF NOT EXISTS messages (
    conv text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    sender text COLLATE "C" NOT NULL,
    client_id text COLLATE "C" NOT NULL,
    ct text NOT NULL,
    body bytea NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (conv, seq)
);
-- Idempotent send: a retried client id maps back to the stored message.
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (conv, sender, client_id);
-- Receipt changes a sender has not acked yet (delivered again on reconnect).
CREATE TABLE IF NOT EXISTS receipt_pending (
    user_name text COLLATE "C" NOT NULL,
    conv text COLLATE "C" NOT NULL,
    rv bigint NOT NULL,
    PRIMARY KEY (user_name, conv)
);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'roost_result'
                   AND typnamespace = current_schema()::regnamespace) THEN
        CREATE TYPE roost_result AS (
            code text, msg text,                       -- a refusal: error code and message
            seq bigint, dup boolean, ct text, body bytea, ts bigint, cid text,
            epoch bigint, members text[],              -- append: recipients when the epoch moved
            admins text[], name text, last_seq bigint, removed text[],   -- group snapshot
            d bigint, r bigint, senders text[],        -- marks
            targets text[], convs text[], rvs bigint[], ads bigint[], ars bigint[]  -- receipts
        );
    END IF;
END $$;
"""

_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION roost_active(p_conv text) RETURNS text[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(user_name ORDER BY user_name), '{}')
    FROM members WHERE conv = p_conv AND left_seq IS NULL
$$;

CREATE OR REPLACE FUNCTION roost_sorted_set(p text[]) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(DISTINCT x COLLATE "C" ORDER BY x COLLATE "C"), '{}') FROM unnest(p) AS x
$$;

CREATE OR REPLACE FUNCTION roost_missing_users(p text[]) RETURNS text[] LANGUAGE sql AS $$
    SELECT roost_sorted_set(array_agg(x)) FROM unnest(p) AS x
    WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.name = x AND u.state <> 'removed')
$$;

-- The next seq of a conversation and the message row, in the caller's transaction.
CREATE OR REPLACE FUNCTION roost_insert(
    p_conv text, p_sender text, p_cid text, p_ct text, p_body bytea, p_ts bigint
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
BEGIN
    UPDATE conversations SET last_seq = last_seq + 1 WHERE id = p_conv RETURNING last_seq INTO v_seq;
    INSERT INTO messages (conv, seq, sender, client_id, ct, body, ts)
        VALUES (p_conv, v_seq, p_sender, p_cid, p_ct, p_body, p_ts);
    RETURN v_seq;
END $$;

CREATE OR REPLACE FUNCTION roost_append(
    p_sender text, p_conv text, p_to text, p_cid text, p_ct text, p_body bytea, p_ts bigint,
    p_epoch bigint
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_epoch bigint;
BEGIN
    SELECT epoch INTO v_epoch FROM conversations WHERE id = p_conv FOR UPDATE;
    IF NOT FOUND THEN
        IF p_to IS NULL THEN
            res.code := 'unknown_conversation'; res.msg := 'no conversation ' || p_conv; RETURN res;
        END IF;
        IF p_to = p_sender THEN
            res.code := 'invalid'; res.msg := 'cannot send a 1:1 message to yourself'; RETURN res;
        END IF;
        PERFORM 1 FROM users WHERE name = p_to AND state <> 'removed';
        IF NOT FOUND THEN
            res.code := 'unknown_user'; res.msg := 'no such user: ' || p_to; RETURN res;
        END IF;
        -- Another gateway may create it at the same moment: the loser waits for
        -- the winner's commit, then does nothing and uses the winner's row.
        INSERT INTO conversations (id, kind, name, last_seq, epoch, created)
            VALUES (p_conv, 'direct', '', 0, 1, p_ts) ON CONFLICT (id) DO NOTHING;
        IF FOUND THEN
            INSERT INTO members (conv, user_name, role, joined_seq, left_seq, delivered, read)
                VALUES (p_conv, p_sender, 'member', 0, NULL, 0, 0), (p_conv, p_to, 'member', 0, NULL, 0, 0);
        END IF;
        SELECT epoch INTO v_epoch FROM conversations WHERE id = p_conv FOR UPDATE;
    END IF;
    -- A retry (looked up first: the sender may have been removed since its
    -- first commit, whose answer was lost; it still gets that answer). Its
    -- first answer may have been lost before anyone was pushed, so name who
    -- should have it (the members when it was sent).
    SELECT m.seq, m.ct, m.body, m.ts INTO res.seq, res.ct, res.body, res.ts
        FROM messages m WHERE m.conv = p_conv AND m.sender = p_sender AND m.client_id = p_cid;
    IF FOUND THEN
        res.dup := true;
        res.members := ARRAY(SELECT user_name FROM members WHERE conv = p_conv AND joined_seq < res.seq
            AND (left_seq IS NULL OR left_seq >= res.seq) ORDER BY user_name);
        RETURN res;
    END IF;
    PERFORM 1 FROM members WHERE conv = p_conv AND user_name = p_sender AND left_seq IS NULL;
    IF NOT FOUND THEN
        res.code := 'not_member'; res.msg := 'not a member of ' || p_conv; RETURN res;
    END IF;
    -- A 1:1 chat whose peer was removed (its member row is gone).
    IF starts_with(p_conv, 'd:') AND (SELECT count(*) FROM members WHERE conv = p_conv) < 2 THEN
        res.code := 'unknown_user'; res.msg := 'no such user (removed) in ' || p_conv; RETURN res;
    END IF;
    res.seq := roost_insert(p_conv, p_sender, p_cid, p_ct, p_body, p_ts);
    res.dup := false;
    res.epoch := v_epoch;
    IF p_epoch IS DISTINCT FROM v_epoch THEN
        res.members := roost_active(p_conv);
    END IF;
    RETURN res;
END $$;

-- Cumulative marks. p_fold >= 0: this ack stands for several folded acks (its
-- index in the batch); if it is refused as past the end, abort the batch so
-- the caller re-runs those acks one by one.
CREATE OR REPLACE FUNCTION roost_mark(
    p_user text, p_conv text, p_d bigint, p_r bigint, p_fold bigint
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_last bigint; v_joined bigint; v_left bigint; v_d bigint; v_r bigint;
    v_upto bigint; v_bad bigint; v_low bigint;
BEGIN
    SELECT last_seq INTO v_last FROM conversations WHERE id = p_conv;
    IF NOT FOUND THEN
        res.code := 'unknown_conversation'; res.msg := 'no conversation ' || p_conv; RETURN res;
    END IF;
    SELECT joined_seq, left_seq, delivered, read INTO v_joined, v_left, v_d, v_r
        FROM members WHERE conv = p_conv AND user_name = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        res.code := 'not_member'; res.msg := 'not a member of ' || p_conv; RETURN res;
    END IF;
    v_upto := CASE WHEN v_left IS NULL THEN v_last ELSE least(v_left, v_last) END;
    IF p_d > v_upto THEN v_bad := p_d; ELSIF p_r > v_upto THEN v_bad := p_r; END IF;
    IF v_bad IS NOT NULL THEN
        IF p_fold >= 0 THEN
            RAISE EXCEPTION 'roost: a folded ack was refused' USING ERRCODE = 'RX001', DETAIL = p_fold::text;
        END IF;
        res.code := 'invalid'; res.msg := format('seq %s is past the end (%s)', v_bad, v_upto); RETURN res;
    END IF;
    res.r := greatest(v_r, coalesce(p_r, 0));
    res.d := greatest(v_d, coalesce(p_d, 0), res.r);
    IF res.d = v_d AND res.r = v_r THEN
        RETURN res;
    END IF;
    UPDATE members SET delivered = res.d, read = res.r WHERE conv = p_conv AND user_name = p_user;
    v_low := CASE WHEN res.r > v_r THEN least(v_d, v_r) ELSE v_d END;
    res.senders := ARRAY(
        SELECT DISTINCT sender FROM messages
        WHERE conv = p_conv AND seq > v_low AND seq <= res.d AND sender <> p_user AND sender <> :system_sender
    );
    IF cardinality(res.senders) > 0 THEN
        -- Remembered for roost_receipts() at the end of this transaction.
        PERFORM set_config('roost.receipts', coalesce(current_setting('roost.receipts', true), '')
            || (SELECT string_agg(p_conv || chr(31) || s || chr(31) || p_user, chr(30))
                FROM unnest(res.senders) AS s)
            || chr(30), true);
    END IF;
    RETURN res;
END $$;

-- One pending receipt per (conversation, sender) changed by this transaction's
-- marks, in key order (concurrent batches lock the rows in the same order),
-- with the marks of every member not yet acked to that sender (receipt_marks).
CREATE OR REPLACE FUNCTION roost_receipts() RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v record; v_rv bigint; v_d bigint; v_r bigint;
    v_pairs text := current_setting('roost.receipts', true);
BEGIN
    res.targets := '{}'; res.convs := '{}'; res.rvs := '{}'; res.ads := '{}'; res.ars := '{}';
    res.mk_targets := '{}'; res.mk_convs := '{}'; res.mk_members := '{}';
    res.mk_ds := '{}'; res.mk_rs := '{}';
    IF v_pairs IS NULL OR v_pairs = '' THEN
        RETURN res;
    END IF;
    FOR v IN
        SELECT p.target, p.conv,
               array_agg(DISTINCT p.member ORDER BY p.member) FILTER (WHERE p.member <> '') AS changed
        FROM (SELECT split_part(x, chr(31), 2) COLLATE "C" AS target,
                     split_part(x, chr(31), 1) COLLATE "C" AS conv,
                     split_part(x, chr(31), 3) COLLATE "C" AS member
              FROM unnest(string_to_array(v_pairs, chr(30))) AS x WHERE x <> '') p
        GROUP BY 1, 2 ORDER BY 1, 2
    LOOP
        INSERT INTO receipt_pending AS rp (user_name, conv, rv) VALUES (v.target, v.conv, 1)
            ON CONFLICT (user_name, conv) DO UPDATE SET rv = rp.rv + 1 RETURNING rp.rv INTO v_rv;
        INSERT INTO receipt_marks AS rm (user_name, conv, member, rv)
            SELECT v.target, v.conv, c, v_rv FROM unnest(coalesce(v.changed, '{}')) AS c
            ON CONFLICT (user_name, conv, member) DO UPDATE SET rv = excluded.rv;
        SELECT res.mk_targets || array_agg(v.target::text), res.mk_convs || array_agg(v.conv::text),
               res.mk_members || array_agg(m.user_name::text), res.mk_ds || array_agg(m.delivered),
               res.mk_rs || array_agg(m.read)
            INTO res.mk_targets, res.mk_convs, res.mk_members, res.mk_ds, res.mk_rs
            FROM receipt_marks rm JOIN members m ON m.conv = rm.conv AND m.user_name = rm.member
            WHERE rm.user_name = v.target AND rm.conv = v.conv;
        SELECT coalesce(min(delivered), 0), coalesce(min(read), 0) INTO v_d, v_r
            FROM members WHERE conv = v.conv AND user_name <> v.target AND left_seq IS NULL;
        res.targets := res.targets || v.target::text;
        res.convs := res.convs || v.conv::text;
        res.rvs := res.rvs || v_rv;
        res.ads := res.ads || v_d;
        res.ars := res.ars || v_r;
    END LOOP;
    PERFORM set_config('roost.receipts', '', true);
    RETURN res;
END $$;

-- The membership system message (sender "", content type p_ct).
-- p_returning: for "added", the re-added users and how they had gone (or NULL).
CREATE OR REPLACE FUNCTION roost_event(
    res roost_result, p_group text, p_actor text, p_action text, p_users text[], p_name text,
    p_ts bigint, p_ct text, p_returning jsonb
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
BEGIN
    SELECT last_seq INTO v_last FROM conversations WHERE id = p_group;
    res.cid := 'sys-' || (v_last + 1);
    res.body := convert_to('{"action":' || to_json(p_action)::text || ',"actor":' || to_json(p_actor)::text
        || ',"users":' || array_to_json(p_users)::text || ',"name":' || to_json(p_name)::text
        || CASE WHEN p_returning IS NULL THEN '' ELSE ',"returning":' || p_returning::text END
        || '}', 'UTF8');
    res.ts := p_ts;
    res.ct := p_ct;
    res.seq := roost_insert(p_group, :system_sender, res.cid, p_ct, res.body, p_ts);
    RETURN res;
END $$;

CREATE OR REPLACE FUNCTION roost_snapshot(res roost_result, p_group text)
RETURNS roost_result LANGUAGE plpgsql AS $$
BEGIN
    SELECT name, last_seq INTO res.name, res.last_seq FROM conversations WHERE id = p_group;
    SELECT coalesce(array_agg(user_name ORDER BY user_name), '{}'),
           coalesce(array_agg(user_name ORDER BY user_name) FILTER (WHERE role = 'admin'), '{}')
        INTO res.members, res.admins
        FROM members WHERE conv = p_group AND left_seq IS NULL;
    RETURN res;
END $$;

CREATE OR REPLACE FUNCTION roost_create_group(
    p_creator text, p_group text, p_name text, p_wanted text[], p_limit bigint, p_ts bigint, p_ct text
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_missing text[];
BEGIN
    IF cardinality(p_wanted) > p_limit THEN
        res.code := 'group_full';
        res.msg := format('a group holds at most %s members (0 + %s requested)',
                          p_limit, cardinality(p_wanted));
        RETURN res;
    END IF;
    v_missing := roost_missing_users(p_wanted);
    IF cardinality(v_missing) > 0 THEN
        res.code := 'unknown_user'; res.msg := 'no such user: ' || array_to_string(v_missing[1:5], ', ');
        RETURN res;
    END IF;
    INSERT INTO conversations (id, kind, name, last_seq, epoch, created)
        VALUES (p_group, 'group', p_name, 0, 1, p_ts) ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        res.code := 'invalid'; res.msg := 'conversation ' || p_group || ' already exists'; RETURN res;
    END IF;
    INSERT INTO members (conv, user_name, role, joined_seq, left_seq, delivered, read)
        SELECT p_group, w, CASE WHEN w = p_creator THEN 'admin' ELSE 'member' END, 0, NULL, 0, 0
        FROM unnest(p_wanted) AS w;
    res := roost_event(res, p_group, p_creator, 'created', p_wanted, p_name, p_ts, p_ct, NULL);
    RETURN roost_snapshot(res, p_group);
END $$;

CREATE OR REPLACE FUNCTION roost_add_members(
    p_actor text, p_group text, p_members text[], p_limit bigint, p_ts bigint, p_ct text
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_kind text; v_name text; v_last bigint; v_role text; v_left bigint;
    v_current text[]; v_new text[]; v_missing text[]; v_returning jsonb;
BEGIN
    SELECT kind, name, last_seq INTO v_kind, v_name, v_last FROM conversations WHERE id = p_group FOR UPDATE;
    IF NOT FOUND OR v_kind <> 'group' THEN
        res.code := 'unknown_conversation'; res.msg := 'no group ' || p_group; RETURN res;
    END IF;
    SELECT role, left_seq INTO v_role, v_left FROM members WHERE conv = p_group AND user_name = p_actor;
    IF NOT FOUND OR v_left IS NOT NULL THEN
        res.code := 'not_member'; res.msg := 'not a member of ' || p_group; RETURN res;
    END IF;
    IF v_role <> 'admin' THEN
        res.code := 'forbidden'; res.msg := 'only an admin of ' || p_group || ' can do that'; RETURN res;
    END IF;
    v_current := roost_active(p_group);
    v_new := roost_sorted_set(ARRAY(SELECT x FROM unnest(p_members) AS x WHERE x <> ALL (v_current)));
    IF cardinality(v_new) = 0 THEN
        RETURN roost_snapshot(res, p_group);
    END IF;
    IF cardinality(v_current) + cardinality(v_new) > p_limit THEN
        res.code := 'group_full';
        res.msg := format('a group holds at most %s members (%s + %s requested)',
                          p_limit, cardinality(v_current), cardinality(v_new));
        RETURN res;
    END IF;
    v_missing := roost_missing_users(v_new);
    IF cardinality(v_missing) > 0 THEN
        res.code := 'unknown_user'; res.msg := 'no such user: ' || array_to_string(v_missing[1:5], ', ');
        RETURN res;
    END IF;
    -- Members re-added: a re-added member never sees the event that took it
    -- out (it sees the group from its new "added" on), so that event says it.
    SELECT jsonb_object_agg(m.user_name, CASE
            WHEN convert_from(e.body, 'UTF8')::jsonb->>'action' = 'left' THEN 'left' ELSE 'removed' END)
        INTO v_returning
        FROM members m LEFT JOIN messages e ON e.conv = m.conv AND e.seq = m.left_seq
        WHERE m.conv = p_group AND m.user_name = ANY (v_new) AND m.left_seq IS NOT NULL;
    -- A member sees everything after this point, starting with the event below.
    INSERT INTO members (conv, user_name, role, joined_seq, left_seq, delivered, read)
        SELECT p_group, x, 'member', v_last, NULL, v_last, v_last FROM unnest(v_new) AS x
        ON CONFLICT (conv, user_name) DO UPDATE SET role = excluded.role, joined_seq = excluded.joined_seq,
            left_seq = NULL, delivered = excluded.delivered, read = excluded.read;
    UPDATE conversations SET epoch = epoch + 1 WHERE id = p_group;
    res := roost_event(res, p_group, p_actor, 'added', v_new, v_name, p_ts, p_ct, v_returning);
    RETURN roost_snapshot(res, p_group);
END $$;

CREATE OR REPLACE FUNCTION roost_remove_members(
    p_actor text, p_group text, p_members text[], p_leaving boolean, p_ts bigint, p_ct text
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_kind text; v_name text; v_role text; v_left bigint; v_gone text[]; v_low bigint;
BEGIN
    SELECT kind, name INTO v_kind, v_name FROM conversations WHERE id = p_group FOR UPDATE;
    IF NOT FOUND OR v_kind <> 'group' THEN
        res.code := 'unknown_conversation'; res.msg := 'no group ' || p_group; RETURN res;
    END IF;
    -- The administrator (actor '', roost user remove) needs no membership.
    SELECT role, left_seq INTO v_role, v_left FROM members WHERE conv = p_group AND user_name = p_actor;
    IF (NOT FOUND OR v_left IS NOT NULL) AND p_actor <> '' THEN
        res.code := 'not_member'; res.msg := 'not a member of ' || p_group; RETURN res;
    END IF;
    IF NOT p_leaving AND p_actor <> '' AND v_role <> 'admin' THEN
        res.code := 'forbidden'; res.msg := 'only an admin of ' || p_group || ' can do that'; RETURN res;
    END IF;
    v_gone := roost_sorted_set(ARRAY(
        SELECT x FROM unnest(p_members) AS x WHERE x = ANY (roost_active(p_group))));
    IF cardinality(v_gone) = 0 THEN
        RETURN roost_snapshot(res, p_group);
    END IF;
    -- The removed see their own removal event, then nothing more.
    res := roost_event(res, p_group, p_actor, CASE WHEN p_leaving THEN 'left' ELSE 'removed' END,
                       v_gone, v_name, p_ts, p_ct, NULL);
    UPDATE members SET left_seq = res.seq WHERE conv = p_group AND user_name = ANY (v_gone);
    -- The aggregates are over the members that remain: a removed member may
    -- have been the last one a message waited for. Every remaining sender of
    -- a message past the lowest read mark of the removed gets a receipt (from
    -- roost_receipts() at the end of this transaction), as if the last ack had come.
    SELECT min(read) INTO v_low FROM members WHERE conv = p_group AND user_name = ANY (v_gone);
    res.senders := ARRAY(
        SELECT DISTINCT m.sender FROM messages m
        JOIN members x ON x.conv = m.conv AND x.user_name = m.sender AND x.left_seq IS NULL
        WHERE m.conv = p_group AND m.seq > v_low AND m.sender <> :system_sender);
    IF cardinality(res.senders) > 0 THEN
        PERFORM set_config('roost.receipts', coalesce(current_setting('roost.receipts', true), '')
            || (SELECT string_agg(p_group || chr(31) || s, chr(30)) FROM unnest(res.senders) AS s)
            || chr(30), true);
    END IF;
    UPDATE conversations SET epoch = epoch + 1 WHERE id = p_group;
    IF NOT EXISTS (SELECT 1 FROM members WHERE conv = p_group AND left_seq IS NULL AND role = 'admin') THEN
        UPDATE members SET role = 'admin'
        WHERE conv = p_group AND user_name = (
            SELECT user_name FROM members WHERE conv = p_group AND left_seq IS NULL
            ORDER BY joined_seq, user_name LIMIT 1);
    END IF;
    res.removed := v_gone;
    RETURN roost_snapshot(res, p_group);
END $$;

CREATE OR REPLACE FUNCTION roost_add_user(p_name text, p_token bytea, p_ts bigint)
RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
BEGIN
    INSERT INTO users (name, token_hash, created) VALUES (p_name, p_token, p_ts) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        res.code := 'invalid';
        IF EXISTS (SELECT 1 FROM users WHERE name = p_name AND state = 'removed') THEN
            res.msg := format('user %L was removed; names are not reused', p_name);
        ELSIF EXISTS (SELECT 1 FROM users WHERE name = p_name) THEN
            res.msg := format('user %L already exists', p_name);
        ELSE
            res.msg := 'that token is already in use';
        END IF;
    END IF;
    RETURN res;
END $$;

-- Account administration. p_state NULL: set the token only.
CREATE OR REPLACE FUNCTION roost_set_account(p_name text, p_token bytea, p_state text)
RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
    v_state text;
BEGIN
    SELECT state INTO v_state FROM users WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        res.code := 'unknown_user'; res.msg := 'no such user: ' || p_name; RETURN res;
    END IF;
    IF v_state = 'removed' AND p_state IS DISTINCT FROM 'removed' THEN
        res.code := 'unknown_user'; res.msg := 'no such user: ' || p_name || ' (removed)'; RETURN res;
    END IF;
    IF p_state = 'removed' THEN
        UPDATE users SET state = p_state, token_hash = p_token WHERE name = p_name;
    ELSIF p_state IS NOT NULL THEN
        UPDATE users SET state = p_state WHERE name = p_name;
    ELSE
        UPDATE users SET token_hash = p_token WHERE name = p_name;
    END IF;
    RETURN res;
END $$;

-- A removed user's member rows (inbox, marks), pending receipts and published
-- keys (schema 6) go; the conversations' epochs move so no gateway pushes to
-- it from a cached list.
CREATE OR REPLACE FUNCTION roost_purge_member(p_name text) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
BEGIN
    UPDATE conversations SET epoch = epoch + 1
        WHERE id IN (SELECT conv FROM members WHERE user_name = p_name);
    DELETE FROM members WHERE user_name = p_name;
    DELETE FROM receipt_pending WHERE user_name = p_name;
    DELETE FROM receipt_marks WHERE user_name = p_name;
    IF to_regclass('key_devices') IS NOT NULL THEN  -- run by a schema before 6 during its migration
        DELETE FROM key_devices WHERE user_name = p_name;
        DELETE FROM key_prekeys WHERE user_name = p_name;
        DELETE FROM key_kem_prekeys WHERE user_name = p_name;
    END IF;
    RETURN res;
END $$;

-- The batch entry point: one call per queued operation, all in one pipeline.
CREATE OR REPLACE FUNCTION roost_op(
    p_kind text, p_a text, p_b text, p_c text, p_d text, p_e text, p_body bytea,
    p_n1 bigint, p_n2 bigint, p_n3 bigint, p_names text[]
) RETURNS roost_result LANGUAGE plpgsql AS $$
DECLARE
    res roost_result;
BEGIN
    CASE p_kind
    WHEN 'append' THEN
        RETURN roost_append(p_a, p_b, p_c, p_d, p_e, p_body, p_n1, p_n2);
    WHEN 'mark' THEN
        RETURN roost_mark(p_a, p_b, p_n1, p_n2, p_n3);
    WHEN 'rack' THEN
        -- Refused like a dack there (one who left still acks their receipts).
        PERFORM 1 FROM members WHERE conv = p_b AND user_name = p_a;
        IF NOT FOUND THEN
            PERFORM 1 FROM conversations WHERE id = p_b;
            IF NOT FOUND THEN
                res.code := 'unknown_conversation'; res.msg := 'no conversation ' || p_b; RETURN res;
            END IF;
            res.code := 'not_member'; res.msg := 'not a member of ' || p_b; RETURN res;
        END IF;
        -- The pending row first, as roost_receipts() locks it before its marks.
        UPDATE receipt_pending SET acked = greatest(acked, p_n1) WHERE user_name = p_a AND conv = p_b;
        DELETE FROM receipt_marks WHERE user_name = p_a AND conv = p_b AND rv <= p_n1;
    WHEN 'lock' THEN
        -- Lock the batch's conversations in id order before touching any of them.
        PERFORM 1 FROM conversations WHERE id = ANY (p_names) ORDER BY id FOR UPDATE;
    WHEN 'receipts' THEN
        RETURN roost_receipts();
    WHEN 'user' THEN
        RETURN roost_add_user(p_a, p_body, p_n1);
    WHEN 'seen' THEN
        UPDATE users SET last_seen = p_n1 WHERE name = p_a;
    WHEN 'account' THEN
        RETURN roost_set_account(p_a, p_body, p_b);
    WHEN 'purge' THEN
        RETURN roost_purge_member(p_a);
    WHEN 'create' THEN
        RETURN roost_create_group(p_a, p_b, p_c, p_names, p_n1, p_n2, p_e);
    WHEN 'add' THEN
        RETURN roost_add_members(p_a, p_b, p_names, p_n1, p_n2, p_e);
    WHEN 'remove' THEN
        RETURN roost_remove_members(p_a, p_b, p_names, p_n2 = 1, p_n1, p_e);
    ELSE
        RAISE EXCEPTION 'roost_op: unknown operation %', p_kind;
    END CASE;
    RETURN res;
END $$;
"""


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


FUNCTIONS = _FUNCTIONS.replace(":system_sender", _sql_literal(SYSTEM_SENDER))

_OP_SQL = (
    "SELECT * FROM roost_op($1::text, $2::text, $3::text, $4::text, $5::text, $6::text, $7::bytea,"
    " $8::bigint, $9::bigint, $10::bigint, $11::text[])"
)

_MSG_COLUMNS = "conv, seq, sender, client_id, ct, body, ts"

OpArgs = tuple[Any, ...]


def _args(
    kind: str,
    a: str | None = None,
    b: str | None = None,
    c: str | None = None,
    d: str | None = None,
    e: str | None = None,
    body: bytes | None = None,
    n1: int | None = None,
    n2: int | None = None,
    n3: int | None = None,
    names: Sequence[str] | None = None,
) -> OpArgs:
    return (kind, a, b, c, d, e, body, n1, n2, n3, names)


@dataclass(slots=True, eq=False)
class _Op:
    kind: str
    args: OpArgs
    future: asyncio.Future[Any]
    stream: SendStream | None = None
    # Ops with the same key in one batch fold into the last of them, their
    # ``cumulative`` values combined by element-wise max (cumulative acks).
    key: tuple[str, ...] | None = None
    cumulative: tuple[int | None, ...] = ()
    lock: str | None = None  # the conversation this op locks (appends, group changes)
    call: Callable[[], Awaitable[Any]] | None = None  # a Python step run alone between batches
    size: int = 0


class _Refold(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _fold(values: list[tuple[int | None, ...]]) -> tuple[int | None, ...]:
    out = values[0]
    for more in values[1:]:
        out = tuple(b if a is None else a if b is None else max(a, b) for a, b in zip(out, more, strict=True))
    return out


@dataclass(slots=True)
class _Plan:
    """One attempt at a batch: the pipeline's argument tuples and what they answer."""

    args: list[OpArgs]
    rows_for: list[_Op | None]  # per tuple: the op it answers (None: lock / receipts)
    leader: dict[int, _Op]  # id(op) -> the op whose result it shares (folded acks)


def _storage_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        asyncpg.PostgresError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.InternalClientError  # e.g. a connection the server just terminated
        | OSError
        | TimeoutError,
    )


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.exceptions.InternalClientError
        | asyncpg.PostgresConnectionError  # includes ConnectionDoesNotExistError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | ConnectionError,
    )


T = TypeVar("T")  # what a read (_read) returns


class PostgresStore:
    """The cluster store. ``dsn`` is a libpq-style URL or key/value string.

    ``max_batch`` / ``max_batch_bytes`` bound one commit (operations, body
    bytes). The batching task has one connection of its own; reads share a
    pool of ``pool_size``. ``cache_size`` bounds the recipients cache
    (conversations). ``batch_timeout`` bounds one batch's round trip; a batch
    that timed out is failed (its outcome is unknown, so nothing is acked).
    Deadlocked or serialization-failed batches are retried ``max_retries``
    times. ``migrate``: create/upgrade the schema in ``open()``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_batch: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
        pool_size: int = 4,
        cache_size: int = 100_000,
        connect_timeout: float = 5.0,
        batch_timeout: float = 30.0,
        max_retries: int = 8,
        migrate: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.dsn = dsn
        self.metrics = metrics or Metrics()
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.pool_size = pool_size
        self.cache_size = cache_size
        self.connect_timeout = connect_timeout
        self.batch_timeout = batch_timeout
        self.max_retries = max_retries
        self.migrate_on_open = migrate
        self._pool: asyncpg.Pool | None = None  # reads
        # Reads every connecting device makes: batched per loop pass (see PassBatcher).
        self._tokens: PassBatcher[bytes, str | None] = PassBatcher(
            self._users_by_token, lambda: None, TOKEN_BATCH
        )
        self._inboxes: PassBatcher[str, list[InboxEntry]] = PassBatcher(self._inboxes_of, list, USER_BATCH)
        self._receipts: PassBatcher[str, list[ReceiptState]] = PassBatcher(
            self._pending_receipts_of, list, USER_BATCH
        )
        # At connect all three at once: one pool checkout per pass, not three.
        self._connect_states: PassBatcher[str, ConnectState] = PassBatcher(
            self._connect_states_of, no_connect_state, USER_BATCH
        )
        # Key uploads and handouts are transactions that can wait on a
        # user's lock and on a commit; at most half the read pool at once, so
        # logins and inbox reads always find a connection (150 devices
        # publishing their first keys at once starved the logins of one
        # gateway past the client's 10 s connect timeout).
        self._key_slots = asyncio.Semaphore(max(1, pool_size // 2))
        self._key_stocks: PassBatcher[tuple[str, int], KeyStock] = PassBatcher(
            self._key_stocks_of, lambda: KeyStock(0, 0, False), USER_BATCH
        )
        # The batching task's own connection (a pool of one, so that a lost
        # connection is replaced on the next batch): commits never queue
        # behind reads for a connection.
        self._write_pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # conv -> (membership epoch, active members): who to push a message to.
        # Only used when the row locked in the append's transaction still has
        # that epoch, so it is safe with other gateways writing.
        self._members: dict[str, tuple[int, tuple[str, ...]]] = {}
        self.commits = 0  # statistics: transactions committed
        self.committed_ops = 0
        self.retries = 0  # batches rolled back and run again (deadlock, serialization, refold)
        self.failed_batches = 0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            self._write_pool = await self._create_pool(1)
            if self.migrate_on_open:
                async with self._write_pool.acquire() as conn:
                    await _migrate(conn)
            self._pool = await self._create_pool(self.pool_size, reset=_keep_session)
        except BaseException as exc:
            for pool in (self._write_pool, self._pool):
                if pool is not None:
                    pool.terminate()
            self._pool = self._write_pool = None
            if _storage_error(exc):
                raise StoreUnavailable(f"cannot open the database: {exc}") from exc
            raise
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="roost-pg-writer")

    async def _create_pool(self, size: int, **options: Any) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=size,
            timeout=self.connect_timeout,
            server_settings={"application_name": "roost"},
            **options,
        )

    async def migrate(self) -> int:
        """Create or upgrade the schema (idempotent; safe with many processes
        at once). Returns the schema version. Works on a store that is not open."""
        if self._pool is not None:
            async with self._pool.acquire() as conn:
                return await _migrate(conn)
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        try:
            return await _migrate(conn)
        finally:
            await conn.close()

    async def close(self) -> None:
        """Finish every queued write, then close. Later writes are refused."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
            self._writer = None
        pools = [p for p in (self._write_pool, self._pool) if p is not None]
        self._pool = self._write_pool = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *_POOL_ERRORS):
                pool.terminate()

    # -- the batching task -------------------------------------------------------

    def _submit(
        self,
        kind: str,
        args: OpArgs,
        stream: SendStream | None = None,
        key: tuple[str, ...] | None = None,
        cumulative: tuple[int | None, ...] = (),
        lock: str | None = None,
        size: int = 0,
    ) -> asyncio.Future[Any]:
        return self._enqueue(_Op(kind, args, self._new_future(), stream, key, cumulative, lock, size=size))

    def _submit_call(self, fn: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Run ``fn`` on the batching task between two batches (maintenance, tests)."""
        return self._enqueue(_Op("call", (), self._new_future(), call=fn))

    def _new_future(self) -> asyncio.Future[Any]:
        if self._loop is None:
            raise StoreUnavailable("store is not open")
        return self._loop.create_future()

    def _enqueue(self, op: _Op) -> asyncio.Future[Any]:
        if self._writer is None or self._closing:
            op.future.set_exception(StoreUnavailable("store is closed"))
        else:
            self._queue.append(op)
            self._wake.set()
        return op.future

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                head = self._queue[0]
                if head.call is not None:
                    self._queue.popleft()
                    await self._run_call(head)
                    continue
                batch: list[_Op] = []
                size = 0
                while (
                    self._queue
                    and len(batch) < self.max_batch
                    and self._queue[0].call is None
                    and (not batch or size + self._queue[0].size <= self.max_batch_bytes)
                ):
                    op = self._queue.popleft()
                    size += op.size
                    batch.append(op)
                try:
                    await self._run_batch(batch)
                except Exception as exc:  # a bug: never leave a caller waiting
                    log.exception("postgres store: batch crashed")
                    self._batch_failed(batch, exc)
        finally:
            failure = StoreUnavailable("store is closed")
            while self._queue:
                op = self._queue.popleft()
                if not op.future.done():
                    op.future.set_exception(failure)

    async def _run_call(self, op: _Op) -> None:
        assert op.call is not None
        try:
            result = await op.call()
        except Exception as exc:
            if not op.future.done():
                op.future.set_exception(exc)
        else:
            if not op.future.done():
                op.future.set_result(result)

    async def _run_batch(self, batch: list[_Op]) -> None:
        live: list[_Op] = []
        broken = StoreUnavailable("an earlier send failed")
        for op in batch:
            if op.stream is not None and op.stream.broken:
                if not op.future.done():
                    op.future.set_exception(broken)
            else:
                live.append(op)
        if not live:
            return
        unfold: set[tuple[str, ...]] = set()
        attempt = 0
        started = time.perf_counter()  # retries included: what the senders waited
        while True:
            plan = self._plan(live, unfold)
            try:
                rows = await self._execute(plan.args)
            except _Refold as refold:
                op = live[refold.index]
                assert op.key is not None
                unfold.add(op.key)
                self.retries += 1
                continue
            except asyncpg.PostgresError as exc:
                if exc.sqlstate in RETRY_SQLSTATES and attempt < self.max_retries:
                    attempt += 1
                    self.retries += 1
                    await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                self._batch_failed(live, exc)
                return
            except Exception as exc:  # connection lost, timeout, server gone, client state broken
                self._batch_failed(live, exc)
                return
            break
        self.commits += 1
        self.committed_ops += len(live)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch_size.observe(len(live))
        outcomes = self._interpret(plan, rows)
        for op in live:
            if op.future.done():
                continue
            ok, value = outcomes[id(plan.leader.get(id(op), op))]
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)

    def _batch_failed(self, batch: list[_Op], exc: BaseException) -> None:
        self.failed_batches += 1
        self.metrics.store_error["commit_failed"].inc()
        self._members.clear()
        log.warning("postgres store: batch of %d failed: %s", len(batch), exc)
        for op in batch:
            if op.stream is not None:
                op.stream.broken = True
        _fail(batch, StoreUnavailable(f"storage error: {exc}"))

    def _plan(self, ops: list[_Op], unfold: set[tuple[str, ...]]) -> _Plan:
        chains: dict[tuple[str, ...], list[_Op]] = {}
        for op in ops:
            if op.key is not None and op.key not in unfold:
                chains.setdefault(op.key, []).append(op)
        leader: dict[int, _Op] = {}
        folded: dict[int, tuple[int | None, ...]] = {}
        for chain in chains.values():
            if len(chain) > 1:
                last = chain[-1]
                folded[id(last)] = _fold([o.cumulative for o in chain])
                for o in chain[:-1]:
                    leader[id(o)] = last
        locks = sorted({op.lock for op in ops if op.lock is not None})
        args: list[OpArgs] = []
        rows_for: list[_Op | None] = []
        if len(locks) > 1:
            args.append(_args("lock", names=locks))
            rows_for.append(None)
        marks = False
        for index, op in enumerate(ops):
            if id(op) in leader:
                continue
            a = op.args
            if op.kind == "append":
                cached = self._members.get(a[2])
                a = (*a[:8], -1 if cached is None else cached[0], *a[9:])
            elif op.kind == "mark":
                d, r = folded.get(id(op), op.cumulative)
                a = (*a[:7], d, r, index if id(op) in folded else -1, a[10])
                marks = True
            elif op.kind == "remove":
                marks = True  # a removal may complete receipts
            elif op.kind == "rack":
                (rv,) = folded.get(id(op), op.cumulative)
                a = (*a[:7], rv, *a[8:])
            args.append(a)
            rows_for.append(op)
        if marks:
            args.append(_args("receipts"))
            rows_for.append(None)
        return _Plan(args, rows_for, leader)

    async def _execute(self, args: list[OpArgs]) -> list[asyncpg.Record]:
        """Run the pipeline; it commits at its Sync (an implicit transaction)."""
        pool = self._write_pool
        if pool is None:
            raise asyncpg.InterfaceError("store is closed")
        started = time.perf_counter()
        conn = await pool.acquire(timeout=self.connect_timeout)
        self.metrics.pool_wait["write"].observe(time.perf_counter() - started)
        try:
            rows: list[asyncpg.Record] = await conn.fetchmany(_OP_SQL, args, timeout=self.batch_timeout)
            return rows
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == REFOLD_SQLSTATE:
                raise _Refold(int(exc.detail or "0")) from exc
            raise
        except BaseException:
            # Connection lost, timed out or cancelled: the connection's state is
            # unknown; never hand it to anybody again.
            conn.terminate()
            raise
        finally:
            with contextlib.suppress(*_POOL_ERRORS):
                await pool.release(conn)

    def _interpret(self, plan: _Plan, rows: list[asyncpg.Record]) -> dict[int, tuple[bool, Any]]:
        outcomes: dict[int, tuple[bool, Any]] = {}
        batch_members: dict[str, tuple[int, tuple[str, ...]]] = {}
        receipts: dict[tuple[str, str], tuple[dict[str, tuple[int, int]], MarkResult]] = {}
        receipt_row: asyncpg.Record | None = None
        for op, row in zip(plan.rows_for, rows, strict=True):
            if op is None:
                if row["targets"] is not None:
                    receipt_row = row
                continue
            code = row["code"]
            if code is not None:
                ref = op.args[4] if op.kind == "append" and code == ErrorCode.UNKNOWN_CONVERSATION else ""
                outcomes[id(op)] = (False, ProtocolError(ErrorCode(code), row["msg"], ref))
                continue
            kind, a = op.kind, op.args
            if kind == "append":
                outcomes[id(op)] = (True, self._appended(a, row, batch_members))
            elif kind == "mark":
                result = MarkResult(a[2], a[1], row["d"], row["r"], [])
                for target in row["senders"] or ():
                    marks, _ = receipts.get((a[2], target), ({}, result))
                    marks[a[1]] = (result.delivered, result.read)
                    # The latest ack of the batch carries the receipt.
                    receipts[(a[2], target)] = (marks, result)
                outcomes[id(op)] = (True, result)
            elif kind in ("create", "add", "remove"):
                snapshot = _snapshot(a[2], row)
                # Receipts a removal completed go out with the group answer.
                carrier = MarkResult(a[2], "", 0, 0, snapshot.receipts)
                for target in row["senders"] or ():  # set by removals only
                    marks, _ = receipts.get((a[2], target), ({}, carrier))
                    receipts[(a[2], target)] = (marks, carrier)
                outcomes[id(op)] = (True, snapshot)
            else:
                outcomes[id(op)] = (True, None)
        if receipt_row is not None:
            for target, conv, member, d, r in zip(
                receipt_row["mk_targets"],
                receipt_row["mk_convs"],
                receipt_row["mk_members"],
                receipt_row["mk_ds"],
                receipt_row["mk_rs"],
                strict=True,
            ):
                if (conv, target) in receipts:  # with the marks not yet acked, as they are now
                    receipts[(conv, target)][0][member] = (d, r)
            found = {
                (conv, target): (rv, ad, ar)
                for target, conv, rv, ad, ar in zip(
                    receipt_row["targets"],
                    receipt_row["convs"],
                    receipt_row["rvs"],
                    receipt_row["ads"],
                    receipt_row["ars"],
                    strict=True,
                )
            }
            for (conv, target), (marks, carrier) in receipts.items():
                if (conv, target) in found:
                    rv, ad, ar = found[(conv, target)]
                    carrier.receipts.append(ReceiptState(target, conv, rv, marks, ad, ar))
        for conv, entry in batch_members.items():
            if conv not in self._members and len(self._members) >= self.cache_size:
                self._members.pop(next(iter(self._members)))
            self._members[conv] = entry
        return outcomes

    def _appended(
        self, a: OpArgs, row: asyncpg.Record, batch_members: dict[str, tuple[int, tuple[str, ...]]]
    ) -> StoredMessage:
        _, sender, conv, _, client_id, ct, body, now, *_ = a
        if row["dup"]:
            recipients = tuple(u for u in row["members"] or () if u != sender)
            return StoredMessage(
                conv, row["seq"], client_id, sender, row["ct"], row["body"], row["ts"], True, recipients
            )
        epoch = row["epoch"]
        if row["members"] is not None:
            members = tuple(row["members"])
            batch_members[conv] = (epoch, members)
        else:  # the epoch we passed still holds: the cached list is current
            entry = batch_members.get(conv) or self._members.get(conv)
            assert entry is not None and entry[0] == epoch, (conv, entry, epoch)
            members = entry[1]
        recipients = tuple(u for u in members if u != sender)
        return StoredMessage(conv, row["seq"], client_id, sender, ct, body, now, False, recipients)

    # -- accounts ----------------------------------------------------------

    def add_user(self, name: str, token_hash: bytes, now: int) -> asyncio.Future[None]:
        return self._submit("user", _args("user", name, body=token_hash, n1=now))

    def set_last_seen(self, user: str, ts: int) -> asyncio.Future[None]:
        return self._submit("seen", _args("seen", user, n1=ts))

    def set_token(self, name: str, token_hash: bytes) -> asyncio.Future[None]:
        return self._submit("account", _args("account", name, body=token_hash))

    def set_user_state(self, name: str, state: str) -> asyncio.Future[None]:
        token = removed_token(name) if state == REMOVED else None
        return self._submit("account", _args("account", name, state, body=token))

    def purge_member(self, name: str) -> asyncio.Future[None]:
        return self._submit("purge", _args("purge", name))

    # -- messages ----------------------------------------------------------

    def append(
        self,
        sender: str,
        client_id: str,
        ct: str,
        body: bytes,
        now: int,
        to: str | None = None,
        conv: str | None = None,
        stream: SendStream | None = None,
    ) -> asyncio.Future[StoredMessage]:
        conv_id = direct_conv_id(sender, to) if to is not None else conv
        assert conv_id is not None
        args = self._append_args(sender, conv_id, to, client_id, ct, body, now)
        return self._submit("append", args, stream, lock=conv_id, size=len(body))

    def _append_args(
        self, sender: str, conv: str, to: str | None, client_id: str, ct: str, body: bytes, now: int
    ) -> OpArgs:
        # n2 (the cached membership epoch) is filled in when the batch is planned.
        return _args("append", sender, conv, to, client_id, ct, body, now)

    def advance_marks(
        self, user: str, conv: str, delivered: int | None, read: int | None
    ) -> asyncio.Future[MarkResult]:
        return self._submit(
            "mark", _args("mark", user, conv), key=("mark", user, conv), cumulative=(delivered, read)
        )

    def ack_receipts(self, user: str, conv: str, rv: int) -> asyncio.Future[None]:
        return self._submit("rack", _args("rack", user, conv), key=("rack", user, conv), cumulative=(rv,))

    # -- groups ------------------------------------------------------------

    def create_group(
        self, creator: str, group: str, name: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]:
        wanted = sorted(set(members) | {creator})
        args = _args("create", creator, group, name, e=MEMBERSHIP_CT, n1=limit, n2=now, names=wanted)
        return self._submit("create", args, lock=group)

    def add_members(
        self, actor: str, group: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]:
        args = _args("add", actor, group, e=MEMBERSHIP_CT, n1=limit, n2=now, names=list(members))
        return self._submit("add", args, lock=group)

    def remove_members(
        self, actor: str, group: str, members: list[str], now: int
    ) -> asyncio.Future[GroupSnapshot]:
        leaving = 1 if members == [actor] else 0
        args = _args("remove", actor, group, e=MEMBERSHIP_CT, n1=now, n2=leaving, names=list(members))
        return self._submit("remove", args, lock=group)

    # -- the key directory (postgres_keys: one statement each, outside the batches) --

    def put_keys(self, upload: KeyUpload) -> asyncio.Future[KeyStock]:
        return asyncio.ensure_future(self._key_op(lambda c: postgres_keys.put_keys(c, upload)))

    def take_keys(self, owner: str) -> asyncio.Future[list[DeviceKeys]]:
        return asyncio.ensure_future(self._key_op(lambda c: postgres_keys.take_keys(c, owner)))

    async def key_stock(self, user: str, device: int) -> KeyStock:
        return await self._key_stocks.get((user, device))

    async def _key_stocks_of(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], KeyStock]:
        return await self._read(lambda c: postgres_keys.key_stocks(c, keys))

    async def _key_op(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """A key write on a pooled connection, tried once: unlike a read, a
        lost answer may hide a commit (a handout retried would waste a key)."""
        pool = self._pool
        if pool is None or self._closing:
            raise StoreUnavailable("store is closed")
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._key_slots.acquire(), self.connect_timeout)
        except TimeoutError:
            raise StoreUnavailable("key directory busy: no free slot in time") from None
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                self.metrics.pool_wait["read"].observe(time.perf_counter() - started)
                return await fn(conn)
        except ProtocolError:
            raise
        except Exception as exc:
            if not _storage_error(exc):
                raise
            raise StoreUnavailable(f"storage error: {exc}") from exc
        finally:
            self._key_slots.release()

    # -- reads ---------------------------------------------------------------

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            pool = self._pool
            if pool is None or self._closing:
                raise StoreUnavailable("store is closed")
            try:
                started = time.perf_counter()
                async with pool.acquire(timeout=self.connect_timeout) as conn:
                    self.metrics.pool_wait["read"].observe(time.perf_counter() - started)
                    return await fn(conn)
            except ProtocolError:
                raise
            except Exception as exc:
                if not _storage_error(exc):
                    raise
                # A pooled connection the server dropped (restart, failover) is
                # only noticed when used; reads are idempotent: one more try on
                # a fresh connection.
                if attempt == 1 and _connection_lost(exc):
                    continue
                raise StoreUnavailable(f"storage error: {exc}") from exc
        raise AssertionError("unreachable")

    # -- blob metadata (roost/store/blobmeta.py) ----------------------------
    # Not on the message path: plain statements on the read pool (autocommit),
    # each idempotent, so _read's one retry on a lost connection is safe.

    def blob_create(self, rec: blobmeta.BlobRecord, quota: int) -> asyncio.Future[None]:
        """Record a new upload; ``quota_exceeded`` if the owner's blobs would pass ``quota``."""

        async def fn(c: asyncpg.Connection) -> None:
            async with c.transaction():
                await c.execute(blobmeta.PG_LOCK_OWNER, rec.owner)  # one owner's checks in turn
                if quota > 0:
                    used = await c.fetchval(blobmeta.PG_USED, rec.owner)
                    if used + rec.size > quota:
                        raise blobmeta.quota_error(used, rec.size, quota)
                await c.execute(
                    blobmeta.PG_INSERT + " ON CONFLICT (id) DO NOTHING", *blobmeta.insert_args(rec)
                )

        return asyncio.ensure_future(self._read(fn))

    async def blob_get(self, blob: str) -> blobmeta.BlobRecord | None:
        async def fn(c: asyncpg.Connection) -> blobmeta.BlobRecord | None:
            row = await c.fetchrow(blobmeta.PG_GET, blob)
            return None if row is None else blobmeta.record(row)

        return await self._read(fn)

    def blob_complete(self, blob: str, now: int) -> asyncio.Future[None]:
        async def fn(c: asyncpg.Connection) -> None:
            await c.execute(blobmeta.PG_COMPLETE, blob, now)

        return asyncio.ensure_future(self._read(fn))

    def blob_fetching(self, blob: str, until: int) -> asyncio.Future[bool]:
        """A download URL valid until ``until`` (ms) is handed out; False: the blob is not complete."""

        async def fn(c: asyncpg.Connection) -> bool:
            status = await c.execute(blobmeta.PG_FETCHING, blob, until)
            return bool(status.endswith(" 1"))

        return asyncio.ensure_future(self._read(fn))

    async def blobs_due(
        self, now: int, pending_before: int, complete_before: int, limit: int
    ) -> list[blobmeta.BlobRecord]:
        async def fn(c: asyncpg.Connection) -> list[blobmeta.BlobRecord]:
            rows = await c.fetch(blobmeta.PG_DUE, now, pending_before, complete_before, limit)
            return [blobmeta.record(row) for row in rows]

        return await self._read(fn)

    def blob_claim(self, blob: str, now: int) -> asyncio.Future[str | None]:
        """Claim for deletion (no URL valid at ``now`` ms); its previous state, or None."""

        async def fn(c: asyncpg.Connection) -> str | None:
            state = await c.fetchval(blobmeta.PG_CLAIM, blob, now)
            return None if state is None else str(state)

        return asyncio.ensure_future(self._read(fn))

    def blob_unclaim(self, blob: str, state: str) -> asyncio.Future[None]:
        async def fn(c: asyncpg.Connection) -> None:
            await c.execute(blobmeta.PG_UNCLAIM, blob, state)

        return asyncio.ensure_future(self._read(fn))

    def blob_delete(self, blob: str) -> asyncio.Future[None]:
        async def fn(c: asyncpg.Connection) -> None:
            await c.execute(blobmeta.PG_DELETE, blob)

        return asyncio.ensure_future(self._read(fn))

    async def user_by_token(self, token_hash: bytes) -> str | None:
        return await self._tokens.get(token_hash)

    async def _users_by_token(self, token_hashes: list[bytes]) -> dict[bytes, str | None]:
        async def fn(c: asyncpg.Connection) -> dict[bytes, str | None]:
            rows = await c.fetch(
                "SELECT token_hash, name FROM users"
                " WHERE token_hash = ANY ($1::bytea[]) AND state = 'active'",
                token_hashes,
            )
            return {bytes(r["token_hash"]): r["name"] for r in rows}

        result: dict[bytes, str | None] = await self._read(fn)
        return result

    async def list_users(self) -> list[Account]:
        async def fn(c: asyncpg.Connection) -> list[Account]:
            rows = await c.fetch("SELECT name, created, state, last_seen FROM users ORDER BY name")
            return [Account(r["name"], r["created"], r["state"], r["last_seen"]) for r in rows]

        accounts: list[Account] = await self._read(fn)
        return accounts

    async def active_groups(self, name: str) -> list[str]:
        async def fn(c: asyncpg.Connection) -> list[str]:
            rows = await c.fetch(
                "SELECT m.conv FROM members m JOIN conversations c ON c.id = m.conv"
                " WHERE m.user_name = $1 AND m.left_seq IS NULL AND c.kind = 'group' ORDER BY m.conv",
                name,
            )
            return [r["conv"] for r in rows]

        groups: list[str] = await self._read(fn)
        return groups

    async def last_seen(self, users: list[str]) -> dict[str, int | None]:
        async def fn(c: asyncpg.Connection) -> dict[str, int | None]:
            rows = await c.fetch("SELECT name, last_seen FROM users WHERE name = ANY ($1::text[])", users)
            found = {r["name"]: r["last_seen"] for r in rows}
            return {u: found[u] for u in users if u in found}

        return await self._read(fn)

    async def inbox(self, user: str) -> list[InboxEntry]:
        return await self._inboxes.get(user)

    async def _inboxes_of(self, users: list[str]) -> dict[str, list[InboxEntry]]:
        result: dict[str, list[InboxEntry]] = await self._read(lambda c: _inboxes(c, users))
        return result

    async def connect_state(self, user: str) -> ConnectState:
        return await self._connect_states.get(user)

    async def _connect_states_of(self, users: list[str]) -> dict[str, ConnectState]:
        async def fn(c: asyncpg.Connection) -> dict[str, ConnectState]:
            inboxes = await _inboxes(c, users)
            receipts = await _pending_receipts(c, users)
            stocks = await postgres_keys.key_stocks(c, [(user, 1) for user in users])
            return {
                user: ConnectState(
                    inboxes.get(user, []), receipts.get(user, []), stocks.get((user, 1), NO_KEYS)
                )
                for user in users
            }

        result: dict[str, ConnectState] = await self._read(fn)
        return result

    async def _member_row(self, c: asyncpg.Connection, user: str, conv: str) -> tuple[Member, int]:
        row = await c.fetchrow(
            "SELECT c.last_seq, m.role, m.joined_seq, m.left_seq, m.delivered, m.read"
            " FROM conversations c LEFT JOIN members m ON m.conv = c.id AND m.user_name = $2"
            " WHERE c.id = $1",
            conv,
            user,
        )
        if row is None or row["role"] is None:
            pair = direct_members(conv)
            if row is None and pair is not None and user in pair:
                # A 1:1 chat nobody wrote in yet: empty, not forbidden.
                return Member(user, MEMBER, 0, None, 0, 0), 0
            if row is None and pair is None:
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {conv}")
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        member = Member(user, row["role"], row["joined_seq"], row["left_seq"], row["delivered"], row["read"])
        return member, row["last_seq"]

    async def read_inboxes(
        self, user: str, reads: Sequence[DrainRequest], budget: int
    ) -> list[DrainPage | ProtocolError]:
        async def fn(c: asyncpg.Connection) -> list[DrainPage | ProtocolError]:
            # The member rows of every conversation asked for in one query;
            # then one message query per conversation until the budget is spent.
            rows = await c.fetch(
                "SELECT c.id, c.last_seq, m.role, m.joined_seq, m.left_seq, m.delivered, m.read"
                " FROM conversations c JOIN members m ON m.conv = c.id AND m.user_name = $2"
                " WHERE c.id = ANY($1::text[])",
                [read.conv for read in reads],
                user,
            )
            found = {
                r["id"]: (
                    Member(user, r["role"], r["joined_seq"], r["left_seq"], r["delivered"], r["read"]),
                    r["last_seq"],
                )
                for r in rows
            }
            pages: list[DrainPage | ProtocolError] = []
            left = budget
            for read in reads:
                if left <= 0:
                    break
                row = found.get(read.conv)
                if row is None:
                    try:  # an empty 1:1 chat, or a refusal to name
                        row = await self._member_row(c, user, read.conv)
                    except ProtocolError as exc:
                        pages.append(exc)
                        continue
                member, last = row
                page = await _inbox_page(c, user, read.conv, member, last, read.after, min(read.limit, left))
                pages.append(page)
                left -= len(page.messages)
            return pages

        return await self._read(fn)

    async def history(
        self, user: str, conv: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[StoredMessage], int, int]:
        async def fn(c: asyncpg.Connection) -> tuple[list[StoredMessage], int, int]:
            member, last = await self._member_row(c, user, conv)
            low = member.joined
            high = member.visible_upto(last)
            if after is not None:
                rows = await c.fetch(_HISTORY_SQL.format(order="ASC"), conv, max(after, low), high, limit)
            else:
                top = high if before is None else min(before - 1, high)
                rows = await c.fetch(_HISTORY_SQL.format(order="DESC"), conv, low, top, limit)
                rows.reverse()
            return [_row_message(r) for r in rows], low + 1, high

        return await self._read(fn)

    async def group_info(self, user: str, group: str) -> GroupSnapshot:
        async def fn(c: asyncpg.Connection) -> GroupSnapshot:
            rows = await c.fetch(
                "SELECT c.kind, c.name, c.last_seq, m.user_name, m.role, m.left_seq"
                " FROM conversations c LEFT JOIN members m ON m.conv = c.id WHERE c.id = $1",
                group,
            )
            if not rows or rows[0]["kind"] != "group":
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no group {group}")
            active = [r for r in rows if r["user_name"] is not None and r["left_seq"] is None]
            if not any(r["user_name"] == user for r in active):
                raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {group}")
            return GroupSnapshot(
                group,
                rows[0]["name"],
                sorted(r["user_name"] for r in active),
                sorted(r["user_name"] for r in active if r["role"] == "admin"),
                rows[0]["last_seq"],
            )

        return await self._read(fn)

    async def active_members(self, user: str, conv: str) -> list[str]:
        async def fn(c: asyncpg.Connection) -> list[str]:
            member, _ = await self._member_row(c, user, conv)
            _require_active(member, conv)
            rows = await c.fetch(
                "SELECT user_name FROM members WHERE conv = $1 AND left_seq IS NULL ORDER BY user_name", conv
            )
            return [r[0] for r in rows]

        return await self._read(fn)

    async def pending_receipts(self, user: str) -> list[ReceiptState]:
        return await self._receipts.get(user)

    async def _pending_receipts_of(self, users: list[str]) -> dict[str, list[ReceiptState]]:
        result: dict[str, list[ReceiptState]] = await self._read(lambda c: _pending_receipts(c, users))
        return result


async def _inboxes(c: asyncpg.Connection, users: list[str]) -> dict[str, list[InboxEntry]]:
    rows = await c.fetch(
        "SELECT m.user_name, m.conv, m.delivered, c.last_seq, m.left_seq FROM members m"
        " JOIN conversations c ON c.id = m.conv"
        " WHERE m.user_name = ANY ($1::text[]) AND c.last_seq > m.delivered"
        " AND (m.left_seq IS NULL OR m.left_seq > m.delivered)"
        " ORDER BY m.user_name, m.conv",
        users,
    )
    out: dict[str, list[InboxEntry]] = {}
    for user, conv, delivered, last, left in rows:
        entry = InboxEntry(conv, delivered, last if left is None else min(left, last))
        out.setdefault(user, []).append(entry)
    return out


async def _pending_receipts(c: asyncpg.Connection, users: list[str]) -> dict[str, list[ReceiptState]]:
    rows = await c.fetch(
        "SELECT r.user_name, r.conv, r.rv, m.user_name AS member, m.joined_seq, m.delivered, m.read,"
        " m.left_seq"
        " FROM receipt_pending r LEFT JOIN members m ON m.conv = r.conv"
        " WHERE r.user_name = ANY ($1::text[]) AND r.rv > r.acked ORDER BY r.user_name, r.conv",
        users,
    )
    # Members who left and had got something are named too (the sender
    # may have been away when they acked); the aggregate is over
    # current members.
    per_conv: dict[tuple[str, str], tuple[int, dict[str, tuple[int, int]], list[tuple[int, int]]]] = {}
    for user, conv, rv, other, joined, d, r, left in rows:
        _, marks, current = per_conv.setdefault((user, conv), (rv, {}, []))
        if other is None or other == user:
            continue
        if left is None:
            current.append((d, r))
        if left is None or d > joined:
            marks[other] = (d, r)
    out: dict[str, list[ReceiptState]] = {}
    for (user, conv), (rv, marks, current) in per_conv.items():
        all_d = min((d for d, _ in current), default=0)
        all_r = min((r for _, r in current), default=0)
        out.setdefault(user, []).append(ReceiptState(user, conv, rv, marks, all_d, all_r))
    return out


async def _inbox_page(
    c: asyncpg.Connection,
    user: str,
    conv: str,
    member: Member,
    last: int,
    after: int | None,
    limit: int,
) -> DrainPage:
    start = member.delivered if after is None else max(after, member.joined)
    upto = member.visible_upto(last)
    # Own messages are only counted, so their bodies are not fetched.
    rows = await c.fetch(
        "SELECT conv, seq, sender, client_id, ct,"
        " CASE WHEN sender = $4 THEN NULL ELSE body END AS body, ts"
        " FROM messages WHERE conv = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $5",
        conv,
        start,
        upto,
        user,
        limit * 4,
    )
    messages: list[StoredMessage] = []
    scanned = start
    for row in rows:
        if len(messages) >= limit:
            break
        scanned = row["seq"]
        if row["sender"] != user:
            messages.append(_row_message(row))
    return DrainPage(conv, start, messages, scanned, upto)


# A page of history, cut after ~1 MiB of bodies (at least one message) like
# SqliteStore's: octet_length() of a TOASTed body does not fetch the body.
_HISTORY_SQL = f"""
SELECT {_MSG_COLUMNS} FROM (
    SELECT *, row_number() OVER w AS rn, sum(octet_length(body)) OVER w AS total
    FROM (
        SELECT {_MSG_COLUMNS} FROM messages WHERE conv = $1 AND seq > $2 AND seq <= $3
        ORDER BY seq {{order}} LIMIT $4
    ) page
    WINDOW w AS (ORDER BY seq {{order}})
) cut
WHERE rn = 1 OR total <= {HISTORY_PAGE_BYTES}
ORDER BY seq {{order}}
"""

_POOL_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


# Schema steps: (version, idempotent SQL). A database at version v gets every
# step above v, in order, in one transaction. Bump SCHEMA_VERSION and add a
# step for every change of a table or a function.
# The functions read users.state (schema 3): every step that (re)creates
# them adds the column first, so a database at any version upgrades.
_ACCOUNT_STATE = "ALTER TABLE users ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'active';\n"

MIGRATIONS: list[tuple[int, str]] = [
    (1, _TABLES + _ACCOUNT_STATE + FUNCTIONS),
    (2, _ACCOUNT_STATE + FUNCTIONS),  # roost_append names a duplicate's recipients
    # roost_op refuses a rack outside the user's conversations; removals
    # complete receipts, "added" names returning members; accounts can be
    # disabled and removed.
    (
        3,
        "DROP FUNCTION IF EXISTS roost_event(roost_result, text, text, text, text[], text, bigint, text);\n"
        + _ACCOUNT_STATE
        + FUNCTIONS,
    ),
    (4, _ACCOUNT_STATE + FUNCTIONS),  # roost_append answers a retry before checking membership
    # A live receipt carries every mark not yet acked (receipt_marks).
    (5, _RECEIPT_MARKS + _ACCOUNT_STATE + FUNCTIONS),
    # The key directory; roost_purge_member deletes a removed user's keys.
    (6, postgres_keys.KEYS_SCHEMA + _ACCOUNT_STATE + FUNCTIONS),
    # Media uploads' metadata (self-contained: renumber freely).
    (blobmeta.POSTGRES_STEP, blobmeta.POSTGRES_SCHEMA),
]
assert MIGRATIONS[-1][0] == SCHEMA_VERSION


async def _migrate(conn: asyncpg.Connection) -> int:
    async with conn.transaction():
        # Many gateways may start at once: one migrates, the others then find
        # the schema current and touch nothing (no DDL, so no table locks).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_SCHEMA_TABLE)
        version = await conn.fetchval("SELECT version FROM roost_schema WHERE id = 1") or 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the database has schema {version}; this Roost knows up to {SCHEMA_VERSION}")
        for step, sql in MIGRATIONS:
            if step > version:
                await conn.execute(sql)
        if version < SCHEMA_VERSION:
            await conn.execute(
                "INSERT INTO roost_schema (id, version) VALUES (1, $1)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version, migrated_at = now()",
                SCHEMA_VERSION,
            )
    return SCHEMA_VERSION


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The read pool's reset on release: nothing to undo. Reads leave no
    session state (no SET, LISTEN, temporary tables, locks or open
    transaction), and asyncpg's default reset is one more round trip per read
    (13% of a gateway's CPU in a reconnect storm)."""


async def migrate(dsn: str) -> int:
    """Create or upgrade the schema at ``dsn`` (for a ``roost migrate`` command)."""
    return await PostgresStore(dsn, migrate=False).migrate()


def _row_message(row: asyncpg.Record) -> StoredMessage:
    body = row["body"]
    return StoredMessage(
        row["conv"],
        row["seq"],
        row["client_id"],
        row["sender"],
        row["ct"],
        b"" if body is None else body,
        row["ts"],
    )


def _snapshot(group: str, row: asyncpg.Record) -> GroupSnapshot:
    members = list(row["members"])
    removed = tuple(row["removed"] or ())
    event = None
    if row["seq"] is not None:
        recipients = tuple(sorted(set(members) | set(removed)))
        event = StoredMessage(
            group, row["seq"], row["cid"], SYSTEM_SENDER, row["ct"], row["body"], row["ts"], False, recipients
        )
    return GroupSnapshot(group, row["name"], members, list(row["admins"]), row["last_seq"], event, removed)


def _fail(batch: list[_Op], exc: Exception) -> None:
    for op in batch:
        if not op.future.done():
            op.future.set_exception(exc)
