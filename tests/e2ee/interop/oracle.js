// Test oracle: Signal's official libsignal (@signalapp/libsignal-client, AGPL)
// answers a list of requests, JSON on stdin -> JSON on stdout, bytes as hex.
// Used only by tests/e2ee/interop (never imported or shipped by roost).
'use strict';

const path = require('path');
const S = require(path.join(process.env.ROOST_LIBSIGNAL_DIR, 'node_modules', '@signalapp', 'libsignal-client'));

const hex = (b) => Buffer.from(b).toString('hex');
const bin = (h) => new Uint8Array(Buffer.from(h, 'hex'));

class MemorySenderKeyStore extends S.SenderKeyStore {
  constructor() { super(); this.records = new Map(); }
  key(sender, id) { return `${sender.name()}.${sender.deviceId()}/${id}`; }
  async saveSenderKey(sender, id, record) { this.records.set(this.key(sender, id), record); }
  async getSenderKey(sender, id) { return this.records.get(this.key(sender, id)) || null; }
}

class MemorySessionStore extends S.SessionStore {
  constructor() { super(); this.sessions = new Map(); }
  async saveSession(address, record) { this.sessions.set(address.toString(), record); }
  async getSession(address) { return this.sessions.get(address.toString()) || null; }
  async getExistingSessions(addresses) { return addresses.map((a) => this.sessions.get(a.toString())); }
}

class MemoryIdentityStore extends S.IdentityKeyStore {
  constructor(privateKey) { super(); this.privateKey = privateKey; this.known = new Map(); }
  async getIdentityKey() { return this.privateKey; }
  async getLocalRegistrationId() { return 7; }
  async saveIdentity(address, key) { this.known.set(address.toString(), key); return S.IdentityChange.NewOrUnchanged; }
  async isTrustedIdentity() { return true; }
  async getIdentity(address) { return this.known.get(address.toString()) || null; }
}

const sender = S.ProtocolAddress.new('alice', 1);

const ops = {
  keypair() {
    const k = S.PrivateKey.generate();
    return { private: hex(k.serialize()), public: hex(k.getPublicKey().serialize()) };
  },
  sign({ private: priv, message }) {
    return hex(S.PrivateKey.deserialize(bin(priv)).sign(bin(message)));
  },
  verify({ public: pub, message, signature }) {
    return S.PublicKey.deserialize(bin(pub)).verify(bin(message), bin(signature));
  },
  fingerprint({ iterations, version, local_id, local_key, remote_id, remote_key }) {
    const f = S.Fingerprint.new(iterations, version, Buffer.from(local_id, 'utf8'),
      S.PublicKey.deserialize(bin(local_key)), Buffer.from(remote_id, 'utf8'), S.PublicKey.deserialize(bin(remote_key)));
    return f.displayableFingerprint().toString();
  },
  async sender_key_encrypt({ distribution_id, plaintexts }) {
    const store = new MemorySenderKeyStore();
    const skdm = await S.SenderKeyDistributionMessage.create(sender, distribution_id, store);
    const messages = [];
    for (const p of plaintexts) {
      messages.push(hex((await S.groupEncrypt(sender, distribution_id, store, bin(p))).serialize()));
    }
    return { skdm: hex(skdm.serialize()), messages };
  },
  async sender_key_decrypt({ skdm, messages }) {
    const store = new MemorySenderKeyStore();
    await S.processSenderKeyDistributionMessage(sender, S.SenderKeyDistributionMessage.deserialize(bin(skdm)), store);
    const out = [];
    for (const m of messages) {
      try { out.push({ ok: hex(await S.groupDecrypt(sender, store, bin(m))) }); }
      catch (e) { out.push({ error: e.constructor.name + ': ' + e.message }); }
    }
    return out;
  },
  skdm_fields({ skdm }) {
    const m = S.SenderKeyDistributionMessage.deserialize(bin(skdm));
    return { chain_id: m.chainId(), iteration: m.iteration(), chain_key: hex(m.chainKey()), distribution_id: m.distributionId() };
  },
  signed_prekey_records({ identity_private }) {
    // What a Signal client uploads: a signed prekey and a Kyber prekey, signed by the identity key.
    const identity = S.PrivateKey.deserialize(bin(identity_private));
    const ec = S.PrivateKey.generate();
    const ecSig = identity.sign(ec.getPublicKey().serialize());
    const signed = S.SignedPreKeyRecord.new(11, Date.now(), ec.getPublicKey(), ec, ecSig);
    const kem = S.KEMKeyPair.generate();
    const kemSig = identity.sign(kem.getPublicKey().serialize());
    const kyber = S.KyberPreKeyRecord.new(12, Date.now(), kem, kemSig);
    return {
      signed_key: hex(signed.publicKey().serialize()), signed_sig: hex(signed.signature()),
      kem_key: hex(kyber.publicKey().serialize()), kem_sig: hex(kyber.signature()),
    };
  },
  async process_bundle({ registration, identity, signed_id, signed_key, signed_sig, prekey_id, prekey_key, kem_id, kem_key, kem_sig }) {
    // libsignal's own session set-up verifies both signatures and parses both key formats.
    const bundle = S.PreKeyBundle.new(registration, 1, prekey_id, prekey_key ? S.PublicKey.deserialize(bin(prekey_key)) : null,
      signed_id, S.PublicKey.deserialize(bin(signed_key)), bin(signed_sig), S.PublicKey.deserialize(bin(identity)),
      kem_id, S.KEMPublicKey.deserialize(bin(kem_key)), bin(kem_sig));
    try {
      await S.processPreKeyBundle(bundle, S.ProtocolAddress.new('bob', 1), sender, new MemorySessionStore(),
        new MemoryIdentityStore(S.PrivateKey.generate()));
      return { ok: true };
    } catch (e) {
      return { ok: false, error: e.constructor.name + ': ' + e.message };
    }
  },
};

async function main() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  const requests = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const answers = [];
  for (const r of requests) answers.push(await ops[r.op](r));
  process.stdout.write(JSON.stringify(answers));
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });
