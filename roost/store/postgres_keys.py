"""The key directory in the cluster store (PostgreSQL schema 6).

Key operations do not ride in the message batches: each is one statement
(a function call) on a pooled connection, its own implicit transaction,
answered after its commit. So an upload of ~220 KB never delays the sends
that would share its batch, and a refused or failed key operation can never
fail a batch of messages; they are rare next to messages (a fetch starts a
conversation with a device; uploads come at install and refill).

Handout: ``DELETE ... WHERE id = (SELECT ... ORDER BY id LIMIT 1 FOR UPDATE
SKIP LOCKED) RETURNING``: a one-time key is deleted and returned by one
statement, so two gateways fetching at once never get the same key; with
SKIP LOCKED the second takes the next key instead of waiting for the first's
commit and then finding nothing. Uploads hold a per-user advisory lock
exclusively and handouts hold it shared, so a bundle never mixes an old
identity with a new identity's keys and two uploads never interleave.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from roost.core.prekeys import MAX_STOCK
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.base import DeviceKeys, KeyStock, KeyUpload

# pg_advisory_xact_lock(class, hashtext(user)): the class of key-directory locks ("keys").
KEYS_LOCK_CLASS = 0x6B657973

KEYS_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS key_devices (
    user_name text COLLATE "C" NOT NULL,
    device integer NOT NULL,
    registration integer NOT NULL,
    identity bytea NOT NULL,
    signed_id integer NOT NULL,
    signed_key bytea NOT NULL,
    signed_sig bytea NOT NULL,
    last_id integer NOT NULL,
    last_key bytea NOT NULL,
    last_sig bytea NOT NULL,
    PRIMARY KEY (user_name, device)
);
CREATE TABLE IF NOT EXISTS key_prekeys (
    user_name text COLLATE "C" NOT NULL,
    device integer NOT NULL,
    id integer NOT NULL,
    key bytea NOT NULL,
    PRIMARY KEY (user_name, device, id)
);
CREATE TABLE IF NOT EXISTS key_kem_prekeys (
    user_name text COLLATE "C" NOT NULL,
    device integer NOT NULL,
    id integer NOT NULL,
    key bytea NOT NULL,
    sig bytea NOT NULL,
    PRIMARY KEY (user_name, device, id)
);

-- Store an upload whole or refuse it whole (a refusal is a code, no error:
-- nothing was written before the checks passed).
CREATE OR REPLACE FUNCTION roost_put_keys(
    p_user text, p_device integer, p_registration integer, p_identity bytea,
    p_signed_id integer, p_signed_key bytea, p_signed_sig bytea,
    p_ec_ids integer[], p_ec_keys bytea[],
    p_kem_ids integer[], p_kem_keys bytea[], p_kem_sigs bytea[],
    p_last_id integer, p_last_key bytea, p_last_sig bytea, p_max bigint,
    OUT code text, OUT msg text, OUT ec bigint, OUT kem bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_identity bytea; v_last integer; v_replace boolean; v_taken integer;
BEGIN
    PERFORM pg_advisory_xact_lock(:lock_class, hashtext(p_user));
    PERFORM 1 FROM users WHERE name = p_user AND state <> 'removed';
    IF NOT FOUND THEN
        code := 'unknown_user'; msg := 'no such user: ' || p_user; RETURN;
    END IF;
    SELECT identity, last_id INTO v_identity, v_last FROM key_devices
        WHERE user_name = p_user AND device = p_device;
    v_replace := NOT FOUND OR v_identity <> p_identity;
    IF v_replace AND p_last_id IS NULL THEN
        code := 'invalid'; msg := 'a first upload (or a new identity) must carry a last_resort key'; RETURN;
    END IF;
    ec := 0; kem := 0;
    IF NOT v_replace THEN
        SELECT min(id) INTO v_taken FROM key_prekeys
            WHERE user_name = p_user AND device = p_device AND id = ANY (p_ec_ids);
        IF v_taken IS NOT NULL THEN
            code := 'duplicate_key_id'; msg := format('prekey id %s is already stored', v_taken); RETURN;
        END IF;
        SELECT min(id) INTO v_taken FROM key_kem_prekeys
            WHERE user_name = p_user AND device = p_device
            AND (id = ANY (p_kem_ids) OR id = p_last_id);
        IF v_taken IS NULL AND coalesce(p_last_id, v_last) = ANY (p_kem_ids) THEN
            v_taken := coalesce(p_last_id, v_last);
        END IF;
        IF v_taken IS NOT NULL THEN
            code := 'duplicate_key_id'; msg := format('kem prekey id %s is already stored', v_taken); RETURN;
        END IF;
        SELECT count(*) INTO ec FROM key_prekeys WHERE user_name = p_user AND device = p_device;
        SELECT count(*) INTO kem FROM key_kem_prekeys WHERE user_name = p_user AND device = p_device;
    END IF;
    IF ec + cardinality(p_ec_ids) > p_max THEN
        code := 'too_many_keys';
        msg := format('prekeys: %s stored + %s new is over %s', ec, cardinality(p_ec_ids), p_max); RETURN;
    END IF;
    IF kem + cardinality(p_kem_ids) > p_max THEN
        code := 'too_many_keys';
        msg := format('kem prekeys: %s stored + %s new is over %s', kem, cardinality(p_kem_ids), p_max);
        RETURN;
    END IF;
    -- Every check passed: from here on only writes.
    IF v_replace THEN
        DELETE FROM key_prekeys WHERE user_name = p_user AND device = p_device;
        DELETE FROM key_kem_prekeys WHERE user_name = p_user AND device = p_device;
        INSERT INTO key_devices (user_name, device, registration, identity, signed_id, signed_key,
                                 signed_sig, last_id, last_key, last_sig)
            VALUES (p_user, p_device, p_registration, p_identity, p_signed_id, p_signed_key,
                    p_signed_sig, p_last_id, p_last_key, p_last_sig)
            ON CONFLICT (user_name, device) DO UPDATE SET registration = excluded.registration,
                identity = excluded.identity, signed_id = excluded.signed_id,
                signed_key = excluded.signed_key, signed_sig = excluded.signed_sig,
                last_id = excluded.last_id, last_key = excluded.last_key, last_sig = excluded.last_sig;
    ELSE
        UPDATE key_devices SET registration = p_registration, signed_id = p_signed_id,
            signed_key = p_signed_key, signed_sig = p_signed_sig,
            last_id = coalesce(p_last_id, last_id), last_key = coalesce(p_last_key, last_key),
            last_sig = coalesce(p_last_sig, last_sig)
            WHERE user_name = p_user AND device = p_device;
    END IF;
    INSERT INTO key_prekeys (user_name, device, id, key)
        SELECT p_user, p_device, i, k FROM unnest(p_ec_ids, p_ec_keys) AS t(i, k);
    INSERT INTO key_kem_prekeys (user_name, device, id, key, sig)
        SELECT p_user, p_device, i, k, s FROM unnest(p_kem_ids, p_kem_keys, p_kem_sigs) AS t(i, k, s);
    ec := ec + cardinality(p_ec_ids);
    kem := kem + cardinality(p_kem_ids);
END $$;

-- A bundle: one row per device, one-time keys handed out (deleted) as they
-- are returned; or one row with a code.
CREATE OR REPLACE FUNCTION roost_take_keys(p_owner text)
RETURNS TABLE (
    code text, msg text, device integer, registration integer, identity bytea,
    signed_id integer, signed_key bytea, signed_sig bytea, pre_id integer, pre_key bytea,
    kem_id integer, kem_key bytea, kem_sig bytea, kem_last_resort boolean, ec_left bigint, kem_left bigint
) LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(:lock_class, hashtext(p_owner));
    PERFORM 1 FROM users u WHERE u.name = p_owner AND u.state <> 'removed';
    IF NOT FOUND THEN
        code := 'unknown_user'; msg := 'no such user: ' || p_owner; RETURN NEXT; RETURN;
    END IF;
    FOR d IN SELECT * FROM key_devices k WHERE k.user_name = p_owner ORDER BY k.device LOOP
        code := NULL; msg := NULL;
        device := d.device; registration := d.registration; identity := d.identity;
        signed_id := d.signed_id; signed_key := d.signed_key; signed_sig := d.signed_sig;
        pre_id := NULL; pre_key := NULL; kem_id := NULL;
        DELETE FROM key_prekeys p WHERE (p.user_name, p.device, p.id) = (
            SELECT q.user_name, q.device, q.id FROM key_prekeys q
            WHERE q.user_name = p_owner AND q.device = d.device
            ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING p.id, p.key INTO pre_id, pre_key;
        DELETE FROM key_kem_prekeys p WHERE (p.user_name, p.device, p.id) = (
            SELECT q.user_name, q.device, q.id FROM key_kem_prekeys q
            WHERE q.user_name = p_owner AND q.device = d.device
            ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING p.id, p.key, p.sig INTO kem_id, kem_key, kem_sig;
        kem_last_resort := kem_id IS NULL;
        IF kem_last_resort THEN
            kem_id := d.last_id; kem_key := d.last_key; kem_sig := d.last_sig;
        END IF;
        SELECT count(*) INTO ec_left FROM key_prekeys q WHERE q.user_name = p_owner AND q.device = d.device;
        SELECT count(*) INTO kem_left FROM key_kem_prekeys q
            WHERE q.user_name = p_owner AND q.device = d.device;
        RETURN NEXT;
    END LOOP;
    IF device IS NULL THEN
        code := 'no_keys'; msg := p_owner || ' has published no keys yet'; RETURN NEXT;
    END IF;
END $$;
"""
).replace(":lock_class", str(KEYS_LOCK_CLASS))


def _refusal(code: str | None, msg: str | None) -> None:
    if code is not None:
        raise ProtocolError(ErrorCode(code), msg or code)


async def put_keys(c: asyncpg.Connection, up: KeyUpload) -> KeyStock:
    last: tuple[Any, ...] = up.last_resort if up.last_resort is not None else (None, None, None)
    row = await c.fetchrow(
        "SELECT * FROM roost_put_keys($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        up.user,
        up.device,
        up.registration,
        up.identity,
        *up.signed,
        [i for i, _ in up.prekeys],
        [k for _, k in up.prekeys],
        [i for i, _, _ in up.kem_prekeys],
        [k for _, k, _ in up.kem_prekeys],
        [s for _, _, s in up.kem_prekeys],
        *last,
        MAX_STOCK,
    )
    _refusal(row["code"], row["msg"])
    return KeyStock(row["ec"], row["kem"], True)


async def take_keys(c: asyncpg.Connection, owner: str) -> list[DeviceKeys]:
    rows = await c.fetch("SELECT * FROM roost_take_keys($1)", owner)
    _refusal(rows[0]["code"], rows[0]["msg"])
    return [
        DeviceKeys(
            r["device"],
            r["registration"],
            r["identity"],
            (r["signed_id"], r["signed_key"], r["signed_sig"]),
            None if r["pre_id"] is None else (r["pre_id"], r["pre_key"]),
            (r["kem_id"], r["kem_key"], r["kem_sig"]),
            r["kem_last_resort"],
            r["ec_left"],
            r["kem_left"],
        )
        for r in rows
    ]


async def key_stocks(c: asyncpg.Connection, keys: list[tuple[str, int]]) -> dict[tuple[str, int], KeyStock]:
    """The stock of each (user, device) in one query; absent: it published nothing."""
    rows = await c.fetch(
        "SELECT d.user_name, d.device,"
        " (SELECT count(*) FROM key_prekeys p WHERE p.user_name = d.user_name AND p.device = d.device) AS ec,"
        " (SELECT count(*) FROM key_kem_prekeys k WHERE k.user_name = d.user_name AND k.device = d.device)"
        " AS kem"
        " FROM key_devices d JOIN unnest($1::text[], $2::integer[]) AS w(u, dev)"
        " ON d.user_name = w.u AND d.device = w.dev",
        [u for u, _ in keys],
        [d for _, d in keys],
    )
    return {(r["user_name"], r["device"]): KeyStock(r["ec"], r["kem"], True) for r in rows}
