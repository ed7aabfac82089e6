//! Forward-secure sealing of the audit trail, in the manner of journald's
//! Forward Secure Sealing: every record of the events log and of the audit
//! store carries a hash chain (`seq`, the `prev` record's MAC, its own
//! MAC), and the MAC key evolves one way every epoch (`k[i+1] =
//! SHA-256("bulkhead seal evolve" ‖ k[i])`, the old key wiped from memory
//! and replaced on disk). Whoever takes the node at epoch `E` holds only
//! `k[E]`: they cannot re-seal a record of an earlier epoch, so they cannot
//! change, remove, insert or reorder the past without `audit verify`
//! noticing. The verification key (the seed `s`, with `k[0] = H(s)`; the
//! start and the epoch length) is printed once by `bulkhead audit
//! setup-keys` and kept off the node.
//!
//! Each output is one chain. Besides the records it carries, a chain holds
//! signed records of its own (`"type":"seal"`): `start` and `stop` (the
//! agent's life), `epoch` (one per epoch, so a tail re-sealed with a later
//! key lacks the epochs in between), and, in the store, `retention` (rows
//! deleted through a `seq`, with the head they ended at). A new events log
//! file (rotation, reopen) begins with a `file` marker: sealed, naming the
//! next record's `seq` and `prev`, so a verifier given only the newer files
//! knows where the chain it can check begins. Records are sealed when the
//! writer takes them, so records held while an output fails keep the key
//! of their time.

pub mod verify;

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize as _, Zeroizing};

use crate::clock;

/// The sealing key's file in the agent's state directory.
pub const KEY_FILE: &str = "audit-seal.key";
/// Bytes of a MAC (and of `prev`): HMAC-SHA-256 truncated to 128 bits.
pub const MAC_LEN: usize = 16;
/// The default epoch: how long one key seals before it is replaced.
pub const DEFAULT_EPOCH_SECS: u64 = 60;

type Key = Zeroizing<[u8; 32]>;

/// `k[i+1]` from `k[i]`.
fn evolve(k: &[u8; 32]) -> Key {
    let mut h = Sha256::new();
    h.update(b"bulkhead seal evolve");
    h.update(k);
    Zeroizing::new(h.finalize().into())
}

/// The MAC of `bytes` in `chain` under key `k`.
fn mac(k: &[u8; 32], chain: &str, bytes: &[u8]) -> [u8; MAC_LEN] {
    mac_with(&prepare(k), chain, bytes)
}

/// HMAC's keyed state, made once per key (it costs two of the ten or so
/// compressions of a record's MAC).
fn prepare(k: &[u8; 32]) -> Hmac<Sha256> {
    <Hmac<Sha256>>::new_from_slice(k).expect("HMAC takes any key length")
}

fn mac_with(keyed: &Hmac<Sha256>, chain: &str, bytes: &[u8]) -> [u8; MAC_LEN] {
    let mut m = keyed.clone();
    m.update(chain.as_bytes());
    m.update(&[0]);
    m.update(bytes);
    let full = m.finalize().into_bytes();
    full[..MAC_LEN].try_into().expect("16 of 32 bytes")
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

fn push_hex(s: &mut String, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
}

/// Lowercase hex only: a verifier that accepted `A` for `a` would let a
/// flipped bit through.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// The key file (mode 0600): the current epoch's key only.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    /// Unix seconds when epoch 0 began.
    start: i64,
    epoch_secs: u64,
    epoch: u64,
    key: String,
}

/// What `audit verify` needs: the seed `k0` (epoch `e` seals with
/// `H^(e+1)(k0)`), the start and the epoch length.
/// Printed as `bh1-<k0 hex>-<start>-<epoch secs>`.
#[derive(Clone)]
pub struct VerifyKey {
    k0: Key,
    pub start: i64,
    pub epoch_secs: u64,
}

impl VerifyKey {
    pub fn parse(s: &str) -> Result<VerifyKey> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [tag, k0, start, epoch] = parts[..] else {
            bail!("not a verification key (expected bh1-<key>-<start>-<epoch>)");
        };
        if tag != "bh1" {
            bail!("not a bulkhead verification key (it should begin with bh1-)");
        }
        Ok(VerifyKey {
            k0: Zeroizing::new(unhex(k0).context("the key part is not 64 lowercase hex digits")?),
            start: start.parse().context("the start part is not a number")?,
            epoch_secs: epoch
                .parse()
                .ok()
                .filter(|e| *e > 0)
                .context("the epoch part is not a positive number")?,
        })
    }

    /// Keys by epoch, computed once each: epoch 0 seals with `H(k0)`, so
    /// the node never holds the verification key itself.
    pub fn keys(&self) -> Keys {
        Keys {
            keys: vec![evolve(&self.k0)],
        }
    }

    /// The RFC 3339 time when `epoch` began.
    pub fn epoch_time(&self, epoch: u64) -> String {
        let secs = self.start + (epoch * self.epoch_secs) as i64;
        clock::format_ts((secs.max(0) as u64) * 1_000_000_000, 0)
    }
}

impl std::fmt::Display for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bh1-{}-{}-{}",
            hex(&self.k0[..]),
            self.start,
            self.epoch_secs
        )
    }
}

pub struct Keys {
    keys: Vec<Key>,
}

impl Keys {
    /// `k[epoch]`; `None` past a bound no honest log reaches (a year of
    /// one-second epochs), so a forged epoch cannot make the verifier spin.
    pub fn get(&mut self, epoch: u64) -> Option<&[u8; 32]> {
        if epoch > 40_000_000 {
            return None;
        }
        while self.keys.len() as u64 <= epoch {
            let next = evolve(self.keys.last().expect("k0"));
            self.keys.push(next);
        }
        Some(&self.keys[epoch as usize])
    }

    pub fn mac(&mut self, epoch: u64, chain: &str, bytes: &[u8]) -> Option<[u8; MAC_LEN]> {
        Some(mac(self.get(epoch)?, chain, bytes))
    }
}

/// `audit setup-keys`: a new key in `dir`; returns the verification key.
/// Refuses to replace an existing key unless `force` (a new key starts new
/// chains that the old verification key cannot check).
pub fn setup(dir: &Path, epoch_secs: u64, force: bool) -> Result<VerifyKey> {
    if epoch_secs == 0 {
        bail!("--epoch must be at least 1s");
    }
    let path = dir.join(KEY_FILE);
    if path.exists() && !force {
        bail!(
            "{} exists: the trail is sealed already; pass --force to start new chains with a new key \
             (records sealed so far stay verifiable only with the old verification key)",
            path.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut k0 = Zeroizing::new([0u8; 32]);
    // SAFETY: getrandom writes at most the 32 bytes it is given.
    let n = unsafe { libc::getrandom(k0.as_mut_ptr().cast(), 32, 0) };
    if n != 32 {
        bail!(
            "reading 32 random bytes: {}",
            std::io::Error::last_os_error()
        );
    }
    let start = clock::now_ns().div_euclid(1_000_000_000);
    write_key(&path, start, epoch_secs, 0, &evolve(&k0))?;
    Ok(VerifyKey {
        k0,
        start,
        epoch_secs,
    })
}

/// Replaces the key file atomically (written beside it, synced, renamed).
fn write_key(path: &Path, start: i64, epoch_secs: u64, epoch: u64, k: &[u8; 32]) -> Result<()> {
    let mut text = serde_json::to_string(&KeyFile {
        version: 1,
        start,
        epoch_secs,
        epoch,
        key: hex(k),
    })?;
    let tmp = path.with_extension("key.new");
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    text.zeroize();
    res.with_context(|| format!("writing the sealing key {}", path.display()))
}

/// The node's sealing key: the current epoch's only.
pub struct Sealer {
    path: PathBuf,
    start: i64,
    epoch_secs: u64,
    epoch: u64,
    key: Key,
    keyed: Hmac<Sha256>,
}

impl Sealer {
    /// The key in `dir`, if `audit setup-keys` made one.
    pub fn open(dir: &Path) -> Result<Option<Sealer>> {
        let path = dir.join(KEY_FILE);
        let mut text = match fs::read_to_string(&path) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut f: KeyFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a bulkhead sealing key", path.display()))?;
        text.zeroize();
        let key = Zeroizing::new(
            unhex(&f.key).with_context(|| format!("{}: a damaged key", path.display()))?,
        );
        f.key.zeroize();
        if f.version != 1 || f.epoch_secs == 0 {
            bail!("{}: an unknown key version", path.display());
        }
        let mut s = Sealer {
            path,
            start: f.start,
            epoch_secs: f.epoch_secs,
            epoch: f.epoch,
            keyed: prepare(&key),
            key,
        };
        s.advance()?;
        Ok(Some(s))
    }

    /// The epoch the clock is in now (never before the key's own).
    fn now_epoch(&self) -> u64 {
        clock_epoch(self.start, self.epoch_secs).max(self.epoch)
    }

    /// Evolves the key to the current epoch; the file is replaced first,
    /// so a crash never leaves a key older than one already used.
    fn advance(&mut self) -> Result<()> {
        let now = self.now_epoch();
        if now == self.epoch {
            return Ok(());
        }
        let mut k = self.key.clone();
        for _ in self.epoch..now {
            k = evolve(&k);
        }
        write_key(&self.path, self.start, self.epoch_secs, now, &k)?;
        // The old key's bytes are wiped as it drops; the keyed HMAC state
        // is as good as the key, so it is wiped before it is replaced.
        // SAFETY: `Hmac<Sha256>` is flat data (hash states and block
        // buffers, no pointers, no drop glue that reads them); it is
        // overwritten with zeros and then assigned a new value.
        unsafe { zeroize::zeroize_flat_type(&mut self.keyed) };
        self.keyed = prepare(&k);
        self.key = k;
        self.epoch = now;
        Ok(())
    }

    /// Seals the bytes `build` makes for the current epoch (the epoch is
    /// part of what is sealed): returns the epoch, the bytes and the MAC.
    fn seal<B: AsRef<[u8]>>(
        &mut self,
        chain: &str,
        build: impl FnOnce(u64) -> B,
    ) -> (u64, B, [u8; MAC_LEN]) {
        if let Err(e) = self.advance() {
            // Sealing on with the old key keeps the trail verifiable; the
            // key is still on disk, so the warning matters.
            tracing::warn!("{e:#}; sealing on with the key of epoch {}", self.epoch);
        }
        let bytes = build(self.epoch);
        let m = mac_with(&self.keyed, chain, bytes.as_ref());
        (self.epoch, bytes, m)
    }
}

/// The epoch the clock is in, for a key that began at `start`.
fn clock_epoch(start: i64, epoch_secs: u64) -> u64 {
    let secs = clock::now_ns().div_euclid(1_000_000_000) - start;
    secs.max(0) as u64 / epoch_secs
}

/// Where a chain stands: the last record's `seq` and MAC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    #[serde(with = "mac_hex")]
    pub mac: [u8; MAC_LEN],
}

mod mac_hex {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &[u8; super::MAC_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(m))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; super::MAC_LEN], D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s).ok_or_else(|| serde::de::Error::custom("not a MAC"))
    }
}

/// A record's seal, as the store keeps it in columns.
#[derive(Clone, Copy, Debug)]
pub struct Seal {
    pub seq: u64,
    pub epoch: u64,
    pub prev: [u8; MAC_LEN],
    pub mac: [u8; MAC_LEN],
}

/// One output's chain.
pub struct Chain {
    pub name: &'static str,
    sealer: Arc<Mutex<Sealer>>,
    /// The next record's `seq` and `prev`.
    next: u64,
    prev: [u8; MAC_LEN],
    /// The epoch of the last `epoch` (or `start`) record.
    epoch: u64,
    /// The key's start and epoch length (fixed), so that the writers can
    /// ask for every record whether an epoch began without taking the
    /// sealer's lock.
    start: i64,
    epoch_secs: u64,
    /// The last record written, for `status`.
    head: Arc<Mutex<Option<Head>>>,
    /// The last record sealed.
    last: Option<Head>,
}

/// The JSON object of a chain's own record, without its seal.
pub fn own_record(what: &str, detail: serde_json::Value) -> serde_json::Value {
    let mut o = serde_json::json!({
        "type": "seal",
        "what": what,
        "ts": clock::format_ts(clock::now_ns().max(0) as u64, 0),
    });
    if let (Some(m), serde_json::Value::Object(d)) = (o.as_object_mut(), detail) {
        m.extend(d);
    }
    o
}

impl Chain {
    /// A chain that continues after `last` (or begins, at seq 0).
    /// `head` is where `status` reads it.
    pub fn new(
        name: &'static str,
        sealer: Arc<Mutex<Sealer>>,
        last: Option<Head>,
        head: Arc<Mutex<Option<Head>>>,
    ) -> Chain {
        let (epoch, start, epoch_secs) = {
            let s = sealer.lock().unwrap_or_else(|e| e.into_inner());
            (s.epoch, s.start, s.epoch_secs)
        };
        *head.lock().unwrap_or_else(|e| e.into_inner()) = last;
        Chain {
            name,
            sealer,
            next: last.map_or(0, |h| h.seq + 1),
            prev: last.map_or([0; MAC_LEN], |h| h.mac),
            epoch,
            start,
            epoch_secs,
            head,
            last,
        }
    }

    /// Seals the bytes `build` makes for the current epoch.
    fn seal<B: AsRef<[u8]>>(&mut self, build: impl FnOnce(u64) -> B) -> (u64, B, [u8; MAC_LEN]) {
        self.sealer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal(self.name, build)
    }

    /// The line of a JSON object (`{...}`, optionally ending in `\n`)
    /// with its seal appended, ending in `\n`; the chain moves on.
    pub fn seal_line(&mut self, text: String) -> (String, Seal) {
        let (seq, prev) = (self.next, self.prev);
        let (line, epoch, mac) = self.line(text);
        self.advance(mac);
        (
            line,
            Seal {
                seq,
                epoch,
                prev,
                mac,
            },
        )
    }

    /// Seals in place: the object's closing brace becomes its seal.
    fn line(&mut self, mut out: String) -> (String, u64, [u8; MAC_LEN]) {
        while out.ends_with('\n') {
            out.pop();
        }
        if out.ends_with('}') {
            out.pop();
        }
        let sep = if out.len() > 1 { "," } else { "" };
        let (seq, prev) = (self.next, self.prev);
        out.reserve(128);
        let (epoch, mut out, mac) = self.seal(|epoch| {
            let _ = write!(out, "{sep}\"seal\":{{\"seq\":{seq},\"epoch\":{epoch}");
            out.push_str(",\"prev\":\"");
            push_hex(&mut out, &prev);
            out.push('"');
            out
        });
        out.push_str(",\"mac\":\"");
        push_hex(&mut out, &mac);
        out.push_str("\"}}\n");
        (out, epoch, mac)
    }

    fn advance(&mut self, mac: [u8; MAC_LEN]) {
        let head = Head {
            seq: self.next,
            mac,
        };
        self.next += 1;
        self.prev = mac;
        self.last = Some(head);
    }

    /// The output wrote every record through `seal`: that is its head (for
    /// `status`; a head that was only sealed could still be lost).
    pub fn written(&self, seal: &Seal) {
        *self.head.lock().unwrap_or_else(|e| e.into_inner()) = Some(Head {
            seq: seal.seq,
            mac: seal.mac,
        });
    }

    /// A new file's first line: sealed, naming the `seq` and `prev` of the
    /// record written after it; the chain does not move on.
    pub fn file_marker(&mut self, file: &Path, seq: u64, prev: [u8; MAC_LEN]) -> String {
        let rec = own_record(
            "file",
            serde_json::json!({ "file": file.display().to_string() }),
        );
        let (next, last) = (self.next, self.prev);
        (self.next, self.prev) = (seq, prev);
        let line = self.line(rec.to_string()).0;
        (self.next, self.prev) = (next, last);
        line
    }

    /// What a writer's `start` record says: this agent, and whether the
    /// chain goes on from an earlier one.
    pub fn start_detail(&self) -> serde_json::Value {
        serde_json::json!({ "pid": std::process::id(), "continues": self.next > 0 })
    }

    /// The next record's `seq` and `prev`.
    pub fn position(&self) -> (u64, [u8; MAC_LEN]) {
        (self.next, self.prev)
    }

    /// The chain's own record `what` (`start`, `stop`, `epoch`, ...), as a
    /// sealed line.
    pub fn own_line(&mut self, what: &str, detail: serde_json::Value) -> (String, Seal) {
        self.epoch = self.current_epoch();
        self.seal_line(own_record(what, detail).to_string())
    }

    /// The epoch the clock is in now (never before the last one marked).
    fn current_epoch(&self) -> u64 {
        clock_epoch(self.start, self.epoch_secs).max(self.epoch)
    }

    /// A new epoch began since the chain's last `epoch` record: the writer
    /// adds one now.
    pub fn epoch_due(&self) -> bool {
        self.current_epoch() > self.epoch
    }

    /// Seals a store row: `values` is the row's canonical form
    /// ([`row_bytes`]); the chain moves on.
    pub fn seal_row(&mut self, table: &str, values: &[rusqlite::types::Value]) -> Seal {
        let (seq, prev) = (self.next, self.prev);
        let (epoch, _, mac) = self.seal(|epoch| row_bytes(table, values, seq, epoch, &prev));
        self.advance(mac);
        Seal {
            seq,
            epoch,
            prev,
            mac,
        }
    }

    /// Marks the start of an epoch in the chain (the caller writes what
    /// [`Chain::own_line`] or a row of kind `seal` carries).
    pub fn note_epoch(&mut self) {
        self.epoch = self.current_epoch();
    }
}

/// The bytes a store row's MAC covers: its table, its columns in schema
/// order (blobs as hex) and its seal's `seq`, `epoch` and `prev`, as one
/// JSON array.
pub fn row_bytes(
    table: &str,
    values: &[rusqlite::types::Value],
    seq: u64,
    epoch: u64,
    prev: &[u8; MAC_LEN],
) -> Vec<u8> {
    use rusqlite::types::Value as V;
    // Written out directly (not through serde_json::Value): the store's
    // writer seals every row.
    let mut out = Vec::with_capacity(512);
    let text = |out: &mut Vec<u8>, t: &str| {
        let _ = serde_json::to_writer(&mut *out, t);
    };
    out.push(b'[');
    text(&mut out, table);
    for v in values {
        out.push(b',');
        match v {
            V::Null => out.extend_from_slice(b"null"),
            V::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
            V::Real(f) => {
                let _ = serde_json::to_writer(&mut out, f);
            }
            V::Text(t) => text(&mut out, t),
            V::Blob(b) => {
                out.push(b'"');
                out.extend_from_slice(hex(b).as_bytes());
                out.push(b'"');
            }
        }
    }
    let _ = write!(out, ",{seq},{epoch},\"{}\"]", hex(prev));
    out
}

/// The last sealed record of an events log file, if its last line is one.
pub fn last_head(path: &Path) -> Option<Head> {
    let text = fs::read(path).ok()?;
    let end = text.len().checked_sub(1)?;
    let start = text[..end]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let v: serde_json::Value = serde_json::from_slice(&text[start..end]).ok()?;
    let s = v.get("seal")?;
    Some(Head {
        seq: s.get("seq")?.as_u64()?,
        mac: unhex(s.get("mac")?.as_str()?)?,
    })
}

/// A chain head kept beside the key (the events log's, at each rotation,
/// reopen and stop): where it continues when its live file is empty.
pub fn head_file(dir: &Path, chain: &str) -> PathBuf {
    dir.join(format!("audit-seal.{chain}.head"))
}

pub fn save_head(path: &Path, head: Option<Head>) {
    let Some(h) = head else { return };
    let tmp = path.with_extension("head.new");
    let res = fs::write(&tmp, serde_json::to_vec(&h).unwrap_or_default())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = res {
        tracing::warn!("saving the chain head {}: {e}", path.display());
    }
}

pub fn load_head(path: &Path) -> Option<Head> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_evolve_one_way_and_the_file_keeps_only_the_current_one() {
        let dir = crate::testdir::tempdir().unwrap();
        let vk = setup(dir.path(), 1, false).unwrap();
        assert!(setup(dir.path(), 1, false).is_err(), "refuses to replace");
        let shown = vk.to_string();
        let parsed = VerifyKey::parse(&shown).unwrap();
        assert_eq!(parsed.to_string(), shown);
        let mut keys = parsed.keys();
        let k0 = *keys.get(0).unwrap();
        let k2 = *keys.get(2).unwrap();
        assert_eq!(k2, *evolve(&evolve(&k0)));
        let on_disk = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert!(on_disk.contains(&hex(&k0)), "epoch 0's key");
        assert!(
            !on_disk.contains(&hex(&parsed.k0[..])),
            "not the verification key"
        );
        // Pretend two epochs passed: the file now holds k[2], not k[0].
        let path = dir.path().join(KEY_FILE);
        let mut f: KeyFile = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        f.start -= 2;
        fs::write(&path, serde_json::to_vec(&f).unwrap()).unwrap();
        let s = Sealer::open(dir.path()).unwrap().unwrap();
        assert!(s.epoch >= 2);
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex(&k0)), "the first key is gone from disk");
        assert!(VerifyKey::parse("bh1-00-1-1").is_err());
        assert!(VerifyKey::parse(&shown.to_uppercase()).is_err());
    }
}
