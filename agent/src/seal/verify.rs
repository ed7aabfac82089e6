//! `bulkhead audit verify`: checks a chain (the events log across its
//! files, or the audit store) against the verification key and reports the
//! first record that was changed, deleted, inserted or reordered, and the
//! range that verified.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result};

use super::{Head, Keys, MAC_LEN, VerifyKey, unhex};

/// What a sealed record is, as far as the chain is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An event, a gap record, a change.
    Record,
    Start,
    Stop,
    Epoch,
    /// A file's first line: names the next record; not in the chain.
    File,
    /// The store deleted rows through `through`, the last with MAC `head`.
    Retention {
        through: u64,
        head: [u8; MAC_LEN],
    },
}

/// One sealed record whose MAC checked out.
#[derive(Clone, Debug)]
pub struct Rec {
    /// `FILE:LINE` or `TABLE row ID`.
    pub place: String,
    pub seq: u64,
    pub epoch: u64,
    pub prev: [u8; MAC_LEN],
    pub mac: [u8; MAC_LEN],
    pub ts: String,
    pub kind: Kind,
}

/// A record that is not a sealed record with a valid MAC.
#[derive(Clone, Debug)]
pub struct Bad {
    pub place: String,
    /// Not sealed at all (allowed before the chain's first record: the
    /// trail before `audit setup-keys`).
    pub unsealed: bool,
    pub why: String,
}

/// The outcome for one chain.
#[derive(Debug, Default)]
pub struct Report {
    pub chain: String,
    /// The first record that failed, and why.
    pub failure: Option<String>,
    pub warnings: Vec<String>,
    /// Records that verified, first and last (`seq`, time).
    pub first: Option<(u64, String)>,
    pub last: Option<(u64, String)>,
    pub records: u64,
    /// Unsealed records before the chain began.
    pub unsealed: u64,
    pub start: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = match (&self.first, &self.last) {
            (Some((s0, t0)), Some((s1, t1))) => {
                format!("seq {s0}..{s1} ({} records), {t0} to {t1}", self.records)
            }
            _ => "no sealed records".into(),
        };
        match &self.failure {
            None => writeln!(f, "{}: verified {range}", self.chain)?,
            Some(why) => {
                writeln!(f, "{}: FAILED: {why}", self.chain)?;
                writeln!(f, "{}: verified before it: {range}", self.chain)?;
            }
        }
        if let Some(s) = &self.start {
            writeln!(f, "{}: {s}", self.chain)?;
        }
        if self.unsealed > 0 {
            writeln!(
                f,
                "{}: {} unsealed records before the chain began (written before `audit setup-keys`)",
                self.chain, self.unsealed
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "{}: warning: {w}", self.chain)?;
        }
        Ok(())
    }
}

/// Checks the records of one chain, in the order they were written.
/// `allowed_start`: the `seq` and `prev` a signed record (the store's
/// latest retention record) says the chain may begin at. `head`: a head
/// recorded off the node (from `status`), to notice a truncated tail.
pub fn check(
    chain: &str,
    key: &VerifyKey,
    records: impl IntoIterator<Item = std::result::Result<Rec, Bad>>,
    allowed_start: Option<(u64, [u8; MAC_LEN])>,
    head: Option<Head>,
) -> Report {
    let mut r = Report {
        chain: chain.to_string(),
        ..Report::default()
    };
    let now_epoch = {
        let secs = crate::clock::now_ns().div_euclid(1_000_000_000) - key.start;
        secs.max(0) as u64 / key.epoch_secs
    };
    let mut last: Option<Rec> = None;
    // A file marker: the record it names must come next.
    let mut marker: Option<Rec> = None;
    let mut head_seen = false;
    let fail = |r: &mut Report, place: &str, why: String| {
        r.failure = Some(format!("{place}: {why}"));
    };
    let records: Vec<_> = records.into_iter().collect();
    let later = |i: usize, seq: u64| {
        records[i + 1..]
            .iter()
            .any(|r| r.as_ref().is_ok_and(|r| r.seq == seq))
    };
    for (i, item) in records.iter().enumerate() {
        let item = item.clone();
        let rec = match item {
            Ok(rec) => rec,
            Err(b) if b.unsealed && last.is_none() && marker.is_none() => {
                r.unsealed += 1;
                continue;
            }
            Err(b) => {
                let after = last.as_ref().map_or(String::new(), |l| {
                    format!(" (after seq {}, {})", l.seq, l.ts)
                });
                fail(&mut r, &b.place, format!("{}{after}", b.why));
                break;
            }
        };
        if rec.epoch > now_epoch + 1 {
            fail(
                &mut r,
                &rec.place,
                format!(
                    "sealed in epoch {} ({}), after now: a forged or changed record",
                    rec.epoch,
                    key.epoch_time(rec.epoch)
                ),
            );
            break;
        }
        if rec.kind == Kind::File {
            marker = Some(rec);
            continue;
        }
        let named = match marker.take() {
            Some(m) if (m.seq, m.prev) != (rec.seq, rec.prev) => {
                fail(
                    &mut r,
                    &rec.place,
                    format!(
                        "seq {} is not the record the file's first line names (seq {}): records were removed or inserted at the start of the file",
                        rec.seq, m.seq
                    ),
                );
                break;
            }
            Some(m) => Some(m.place),
            None => None,
        };
        match &last {
            None => {
                let genesis = rec.seq == 0 && rec.prev == [0; MAC_LEN];
                if allowed_start == Some((rec.seq, rec.prev)) {
                    r.start = Some(format!(
                        "begins at seq {}: retention deleted the records before it (a signed record says so)",
                        rec.seq
                    ));
                } else if let Some(file) = named.filter(|_| !genesis) {
                    r.start = Some(format!(
                        "begins at seq {} ({file}, a file's first line): older records are in files not given, or rotated away",
                        rec.seq
                    ));
                } else if !genesis {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "the chain's first record is seq {} and no signed record says why the ones before it are gone: they were deleted",
                            rec.seq
                        ),
                    );
                    break;
                }
            }
            Some(l) => {
                if rec.seq <= l.seq {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "seq {} comes after seq {}: a record was inserted or records reordered",
                            rec.seq, l.seq
                        ),
                    );
                    break;
                }
                if rec.seq > l.seq + 1 && later(i, l.seq + 1) {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "seq {} comes before seq {}: a record was inserted or records reordered",
                            rec.seq,
                            l.seq + 1
                        ),
                    );
                    break;
                }
                if rec.seq > l.seq + 1 {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "records seq {}..{} are missing after {} ({}): deleted",
                            l.seq + 1,
                            rec.seq - 1,
                            l.place,
                            l.ts
                        ),
                    );
                    break;
                }
                if rec.prev != l.mac {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "seq {} does not follow the record before it ({}): that record was replaced",
                            rec.seq, l.place
                        ),
                    );
                    break;
                }
                if rec.epoch < l.epoch {
                    fail(
                        &mut r,
                        &rec.place,
                        format!(
                            "seq {} was sealed in epoch {}, before seq {} (epoch {}): re-sealed with a later key, or reordered",
                            rec.seq, rec.epoch, l.seq, l.epoch
                        ),
                    );
                    break;
                }
                if rec.epoch > l.epoch + 1 {
                    let span = format!(
                        "no seals from {} to {}",
                        key.epoch_time(l.epoch + 1),
                        key.epoch_time(rec.epoch)
                    );
                    match (&l.kind, &rec.kind) {
                        (Kind::Stop, Kind::Start) => {}
                        (_, Kind::Start) => r.warnings.push(format!(
                            "{span}: the agent did not stop cleanly before seq {} (a crash, a kill -9 or a power loss)",
                            rec.seq
                        )),
                        _ => {
                            fail(
                                &mut r,
                                &rec.place,
                                format!(
                                    "{span} before seq {} and no start record: the records from seq {} on were re-sealed with a later key",
                                    rec.seq, rec.seq
                                ),
                            );
                            break;
                        }
                    }
                }
            }
        }
        if let Some(h) = head
            && rec.seq == h.seq
        {
            head_seen = true;
            if rec.mac != h.mac {
                fail(
                    &mut r,
                    &rec.place,
                    format!(
                        "seq {} is not the record the head recorded off the node names",
                        rec.seq
                    ),
                );
                break;
            }
        }
        if r.first.is_none() {
            r.first = Some((rec.seq, rec.ts.clone()));
        }
        r.last = Some((rec.seq, rec.ts.clone()));
        r.records += 1;
        last = Some(rec);
    }
    if r.failure.is_none()
        && let Some(h) = head
        && !head_seen
    {
        let end = last
            .as_ref()
            .map_or("the start".to_string(), |l| format!("seq {}", l.seq));
        r.failure = Some(format!(
            "the chain ends at {end}, before the head recorded off the node (seq {}): its tail was removed",
            h.seq
        ));
    }
    r
}

/// Parses and checks the MAC of one events log line.
pub fn line(
    chain: &str,
    keys: &mut Keys,
    place: String,
    text: &str,
) -> std::result::Result<Rec, Bad> {
    let bad = |why: &str, unsealed: bool| Bad {
        place: place.clone(),
        unsealed,
        why: why.to_string(),
    };
    const MARK: &str = ",\"mac\":\"";
    // A line with anything of a seal is a sealed record: only a line with
    // none may be one written before the trail was sealed.
    let sealed = text.contains("\"mac\"") || text.contains("\"seal\"");
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| bad("not a JSON record (changed, or a torn line)", false))?;
    let Some(seal) = v.get("seal") else {
        return Err(bad("not sealed (inserted, or its seal removed)", !sealed));
    };
    let (prefix, rest) = match text.rfind(MARK) {
        Some(i) => (&text[..i], &text[i + MARK.len()..]),
        None => return Err(bad("its seal has no MAC", false)),
    };
    let mac = rest
        .strip_suffix("\"}}")
        .and_then(unhex::<MAC_LEN>)
        .ok_or_else(|| bad("its MAC is malformed (changed)", false))?;
    let field = |k: &str| seal.get(k);
    let (Some(seq), Some(epoch), Some(prev)) = (
        field("seq").and_then(|s| s.as_u64()),
        field("epoch").and_then(|s| s.as_u64()),
        field("prev")
            .and_then(|s| s.as_str())
            .and_then(unhex::<MAC_LEN>),
    ) else {
        return Err(bad("its seal is malformed (changed)", false));
    };
    if field("mac")
        .and_then(|m| m.as_str())
        .and_then(unhex::<MAC_LEN>)
        != Some(mac)
    {
        return Err(bad("its seal is malformed (changed)", false));
    }
    match keys.mac(epoch, chain, prefix.as_bytes()) {
        Some(m) if m == mac => {}
        _ => {
            return Err(bad(
                &format!("seq {seq}: changed (its MAC does not match)"),
                false,
            ));
        }
    }
    let ts = v
        .get("ts")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    let kind = kind_of(&v);
    Ok(Rec {
        place,
        seq,
        epoch,
        prev,
        mac,
        ts,
        kind,
    })
}

/// The kind of a sealed record from its JSON (`{"type":"seal","what":..}`).
pub fn kind_of(v: &serde_json::Value) -> Kind {
    if v.get("type").and_then(|t| t.as_str()) != Some("seal") {
        return Kind::Record;
    }
    match v.get("what").and_then(|w| w.as_str()) {
        Some("start") => Kind::Start,
        Some("stop") => Kind::Stop,
        Some("epoch") => Kind::Epoch,
        Some("file") => Kind::File,
        Some("retention") => match (
            v.get("through").and_then(|t| t.as_u64()),
            v.get("head")
                .and_then(|h| h.as_str())
                .and_then(unhex::<MAC_LEN>),
        ) {
            (Some(through), Some(head)) => Kind::Retention { through, head },
            _ => Kind::Record,
        },
        _ => Kind::Record,
    }
}

/// The events log's files, oldest first (by the `seq` their chain begins
/// at), checked as one chain.
pub fn logs(files: &[&Path], key: &VerifyKey, head: Option<Head>) -> Result<Report> {
    let mut texts = Vec::new();
    for f in files {
        let t = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let first = first_seq(&t);
        texts.push((first, f.display().to_string(), t));
    }
    texts.sort_by_key(|(first, _, _)| *first);
    let mut keys = key.keys();
    let mut recs = Vec::new();
    for (_, name, t) in &texts {
        let mut rest = &t[..];
        let mut n = 0;
        while !rest.is_empty() {
            n += 1;
            let place = format!("{name}:{n}");
            let Some(i) = rest.iter().position(|b| *b == b'\n') else {
                recs.push(Err(Bad {
                    place,
                    unsealed: false,
                    why: "the last line is not terminated (torn or changed)".into(),
                }));
                break;
            };
            let text = String::from_utf8_lossy(&rest[..i]);
            recs.push(line("events-log", &mut keys, place, &text));
            rest = &rest[i + 1..];
        }
    }
    Ok(check("events-log", key, recs, None, head))
}

/// The `seq` of a file's first sealed line (files with none sort first).
fn first_seq(t: &[u8]) -> u64 {
    t.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("seal")?.get("seq")?.as_u64())
        .unwrap_or(0)
}

/// The audit store's chain: every row of `events` and `changes` in `seq`
/// order. Rows written before the store was sealed may precede it.
pub fn store(path: &Path, key: &VerifyKey, head: Option<Head>) -> Result<Report> {
    use rusqlite::types::Value;
    let rows = crate::runtime::store::sealed_rows(path)?;
    let mut keys = key.keys();
    let mut recs: Vec<(u64, std::result::Result<Rec, Bad>)> = Vec::new();
    let mut unsealed: Vec<(i64, String)> = Vec::new();
    for row in rows {
        let place = format!("{} row {}", row.table, row.id);
        let ts_ns = match row.values.first() {
            Some(Value::Integer(t)) => *t,
            _ => 0,
        };
        let ts = match row.values.get(1) {
            Some(Value::Text(t)) => t.clone(),
            _ => String::new(),
        };
        let bad = |why: String| Bad {
            place: place.clone(),
            unsealed: false,
            why,
        };
        let [seq, epoch, prev, mac] = &row.seal;
        let parsed = match (seq, epoch, prev, mac) {
            (Value::Null, Value::Null, Value::Null, Value::Null) => {
                unsealed.push((ts_ns, place));
                continue;
            }
            (Value::Integer(s), Value::Integer(e), Value::Text(p), Value::Text(m)) => {
                match (unhex::<MAC_LEN>(p), unhex::<MAC_LEN>(m)) {
                    (Some(p), Some(m)) if *s >= 0 && *e >= 0 => Some((*s as u64, *e as u64, p, m)),
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((seq, epoch, prev, mac)) = parsed else {
            recs.push((
                0,
                Err(bad("its seal columns are malformed (changed)".into())),
            ));
            continue;
        };
        let bytes = super::row_bytes(row.table, &row.values, seq, epoch, &prev);
        if keys.mac(epoch, "audit-store", &bytes) != Some(mac) {
            recs.push((
                seq,
                Err(bad(format!(
                    "seq {seq} ({ts}): changed (its MAC does not match)"
                ))),
            ));
            continue;
        }
        let kind = match (row.table, row.values.get(2), row.values.get(6)) {
            ("changes", Some(Value::Text(k)), Some(Value::Text(detail))) if k == "seal" => {
                serde_json::from_str(detail).map_or(Kind::Record, |v| kind_of(&v))
            }
            _ => Kind::Record,
        };
        recs.push((
            seq,
            Ok(Rec {
                place,
                seq,
                epoch,
                prev,
                mac,
                ts,
                kind,
            }),
        ));
    }
    recs.sort_by_key(|(seq, _)| *seq);
    // The chain may begin where the latest retention row says.
    let allowed_start = recs
        .iter()
        .filter_map(|(_, r)| match r {
            Ok(Rec {
                kind: Kind::Retention { through, head },
                ..
            }) => Some((through + 1, *head)),
            _ => None,
        })
        .max_by_key(|(s, _)| *s);
    let first_sealed_ns = recs
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter_map(|r| crate::clock::parse_ts(&r.ts))
        .min();
    let mut report = check(
        "audit-store",
        key,
        recs.into_iter().map(|(_, r)| r),
        allowed_start,
        head,
    );
    report.unsealed = unsealed.len() as u64;
    if report.failure.is_none()
        && let Some(first) = first_sealed_ns
        && let Some((_, place)) = unsealed.iter().find(|(t, _)| *t >= first)
    {
        report.failure = Some(format!(
            "{place}: not sealed, yet newer than the chain's first record: inserted"
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::PathBuf,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;
    use crate::{
        runtime::sink::{Lines, Rotation},
        seal::{Sealer, hex, setup},
    };

    /// A sealed events log of `n` events written over about `secs`
    /// seconds (one-second epochs), rotated at `max_bytes`.
    fn sealed_log(
        n: usize,
        secs: u64,
        max_bytes: u64,
    ) -> (crate::testdir::TempDir, VerifyKey, PathBuf) {
        let dir = crate::testdir::tempdir().unwrap();
        let key = setup(dir.path(), 1, false).unwrap();
        let sealer = Arc::new(Mutex::new(Sealer::open(dir.path()).unwrap().unwrap()));
        let path = dir.path().join("events.jsonl");
        let (l, _) = Lines::file(
            &path,
            Rotation { max_bytes, keep: 9 },
            Some((sealer, dir.path().join("head"))),
        )
        .unwrap();
        for i in 0..n {
            let ts = crate::clock::format_ts(crate::clock::now_ns() as u64, 0);
            l.send(
                &ts,
                format!("{{\"ts\":\"{ts}\",\"verdict\":\"deny\",\"i\":{i}}}\n"),
            );
            std::thread::sleep(Duration::from_millis(secs * 1000 / n as u64));
        }
        l.finish(Duration::from_secs(10));
        (dir, key, path)
    }

    fn files(path: &Path) -> Vec<PathBuf> {
        let mut v = vec![path.to_path_buf()];
        for n in 1..10 {
            let p = PathBuf::from(format!("{}.{n}", path.display()));
            if p.exists() {
                v.push(p);
            }
        }
        v
    }

    fn verify_files(files: &[PathBuf], key: &VerifyKey) -> Report {
        let f: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        logs(&f, key, None).unwrap()
    }

    fn lines(p: &Path) -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(p: &Path, l: &[String]) {
        fs::write(p, l.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn a_clean_log_verifies_across_rotations_and_a_missing_oldest_file() {
        let (_d, key, path) = sealed_log(60, 3, 2000);
        // A write that fills the file rotates it, so the live file may be
        // empty: it holds no records to hole or cut.
        let all: Vec<PathBuf> = files(&path)
            .into_iter()
            .filter(|p| fs::metadata(p).unwrap().len() > 0)
            .collect();
        assert!(all.len() >= 3, "rotated: {all:?}");
        let newest = &all[0];
        let r = verify_files(&all, &key);
        assert!(r.ok(), "{r}");
        assert!(r.records >= 60, "{r}");
        // The oldest file rotated away: the next begins with its marker.
        let r = verify_files(&all[..all.len() - 1], &key);
        assert!(r.ok(), "{r}");
        assert!(r.start.is_some(), "{r}");
        // A file in the middle missing is a hole.
        let mut holed = all.clone();
        holed.remove(1);
        assert!(!verify_files(&holed, &key).ok());
        // A head kept off the node: the full trail reaches it, a cut one not.
        let last = lines(newest).last().unwrap().clone();
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        let head = Head {
            seq: v["seal"]["seq"].as_u64().unwrap(),
            mac: unhex(v["seal"]["mac"].as_str().unwrap()).unwrap(),
        };
        let f: Vec<&Path> = all.iter().map(|p| p.as_path()).collect();
        assert!(logs(&f, &key, Some(head)).unwrap().ok());
        let mut cut = lines(newest);
        cut.pop();
        write_lines(newest, &cut);
        let r = logs(&f, &key, Some(head)).unwrap();
        assert!(
            r.failure.as_deref().unwrap().contains("tail was removed"),
            "{r}"
        );
    }

    #[test]
    fn every_flipped_bit_of_a_short_log_is_detected() {
        let (_d, key, path) = sealed_log(4, 1, 0);
        let clean = fs::read(&path).unwrap();
        assert!(verify_files(std::slice::from_ref(&path), &key).ok());
        let flipped = path.with_extension("flipped");
        let mut missed = Vec::new();
        for byte in 0..clean.len() {
            for bit in 0..8 {
                let mut b = clean.clone();
                b[byte] ^= 1 << bit;
                fs::write(&flipped, &b).unwrap();
                if verify_files(std::slice::from_ref(&flipped), &key).ok() {
                    missed.push((byte, bit));
                }
            }
        }
        assert!(
            missed.is_empty(),
            "{} of {} flips missed: {missed:?}",
            missed.len(),
            clean.len() * 8
        );
    }

    #[test]
    fn deleted_swapped_inserted_and_resealed_lines_are_detected() {
        let (_d, key, path) = sealed_log(12, 3, 0);
        let clean = lines(&path);
        assert!(verify_files(std::slice::from_ref(&path), &key).ok());
        let check = |l: &[String], expect: &str| {
            let p = path.with_extension("t");
            write_lines(&p, l);
            let r = verify_files(&[p], &key);
            let f = r
                .failure
                .clone()
                .unwrap_or_else(|| panic!("not detected ({expect}):\n{r}"));
            assert!(f.contains(expect), "{expect}: {f}");
        };
        let mut l = clean.clone();
        l.remove(5);
        check(&l, "missing");
        let mut l = clean.clone();
        l.swap(5, 6);
        check(&l, "inserted or records reordered");
        let mut l = clean.clone();
        l.swap(5, 8);
        check(&l, "inserted or records reordered");
        let mut l = clean.clone();
        l.insert(5, clean[4].clone());
        check(&l, "inserted or records reordered");
        let mut l = clean.clone();
        l.insert(5, "{\"verdict\":\"allow\"}".into());
        check(&l, "not sealed");
        // The first records: after the file's marker, or with it.
        let mut l = clean.clone();
        l.remove(1);
        check(&l, "removed or inserted at the start");
        let mut l = clean.clone();
        l.drain(..2);
        check(&l, "deleted");
        // Changed, and re-sealed with the key of a later epoch (the one an
        // attacker holding the node now would have).
        let i = clean
            .iter()
            .position(|l| l.contains("\"verdict\":\"deny\""))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&clean[i]).unwrap();
        let now = (crate::clock::now_ns() / 1_000_000_000 - key.start) as u64;
        let later = now / key.epoch_secs;
        assert!(later >= v["seal"]["epoch"].as_u64().unwrap() + 2);
        let body = &clean[i][..clean[i].find(",\"seal\":").unwrap()];
        let body = body.replace("\"deny\"", "\"allow\"");
        let prefix = format!(
            "{body},\"seal\":{{\"seq\":{},\"epoch\":{later},\"prev\":\"{}\"",
            v["seal"]["seq"],
            v["seal"]["prev"].as_str().unwrap()
        );
        let mut keys = key.keys();
        let mac = keys.mac(later, "events-log", prefix.as_bytes()).unwrap();
        let mut l = clean.clone();
        l[i] = format!("{prefix},\"mac\":\"{}\"}}}}", hex(&mac));
        check(&l, "");
        // The whole tail re-sealed with the later key lacks its epochs.
        let mut l = clean[..i].to_vec();
        let mut prev = v["seal"]["prev"].as_str().unwrap().to_string();
        for (k, line) in clean[i..].iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let body = &line[..line.find(",\"seal\":").unwrap()];
            let prefix = format!(
                "{body},\"seal\":{{\"seq\":{},\"epoch\":{later},\"prev\":\"{prev}\"",
                v["seal"]["seq"]
            );
            let mac = hex(&keys.mac(later, "events-log", prefix.as_bytes()).unwrap());
            l.push(format!("{prefix},\"mac\":\"{mac}\"}}}}"));
            prev = mac;
            let _ = k;
        }
        check(&l, "re-sealed with a later key");
    }

    fn record(i: usize) -> crate::runtime::events::Record {
        serde_json::from_value(serde_json::json!({
            "ts": crate::clock::format_ts(crate::clock::now_ns() as u64, 0),
            "verdict": "deny", "reason": "cross-domain", "hook": "connect4", "proto": "tcp",
            "src": null, "sport": null, "dst": "10.40.0.7", "dport": 5432 + i,
            "pid": 1, "comm": "psql", "uid": 1000, "cgroup": "/c.slice/job", "cgroup_id": 7,
            "src_domain": "contractor", "dst_domain": "production", "country": null,
            "geo_source": null, "bridge": null, "generation": 1, "seq": i, "cpu": 0
        }))
        .unwrap()
    }

    fn wait_written(s: &crate::runtime::store::Store, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.counts.written.load(std::sync::atomic::Ordering::Relaxed) < n
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_store_verifies_through_retention_and_notices_changed_and_deleted_rows() {
        use crate::runtime::store::{Change, Store};
        let dir = crate::testdir::tempdir().unwrap();
        let key = setup(dir.path(), 1, false).unwrap();
        let sealer = Arc::new(Mutex::new(Sealer::open(dir.path()).unwrap().unwrap()));
        let db = dir.path().join("audit.db");
        let store = Store::start(&db, Duration::from_secs(2), Some(sealer)).unwrap();
        for i in 0..10 {
            store.event(record(i));
        }
        store.change(Change {
            kind: "load".into(),
            policy: Some("/p.yaml".into()),
            sha256: Some("ab".into()),
            generation: Some(1),
            detail: String::new(),
        });
        wait_written(&store, 10);
        // Retention (2 s) deletes those rows, through a signed row.
        std::thread::sleep(Duration::from_millis(3500));
        for i in 10..15 {
            let mut r = record(i);
            // A name is sealed when an event has one (`egress.names`).
            if i == 13 {
                r.name = Some("*.pkg.dev".into());
            }
            store.event(r);
        }
        wait_written(&store, 15);
        std::thread::sleep(Duration::from_millis(600));
        // No more pruning from here: retention would delete the rows this
        // test changes once they are two seconds old.
        store.finish(Duration::from_secs(5));
        let r = store_report(&db, &key);
        assert!(r.ok(), "{r}");
        assert!(
            r.start.as_deref().unwrap_or("").contains("retention"),
            "{r}"
        );
        let c = rusqlite::Connection::open(&db).unwrap();
        let events: i64 = c
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(events, 5, "retention deleted the first ten");
        // A changed column.
        c.execute("UPDATE events SET verdict = 'allow' WHERE dport = 5444", [])
            .unwrap();
        fails_with(&db, &key, "changed");
        c.execute("UPDATE events SET verdict = 'deny' WHERE dport = 5444", [])
            .unwrap();
        assert!(store_report(&db, &key).ok());
        // A name taken away, or given to an event that had none.
        c.execute("UPDATE events SET name = NULL WHERE dport = 5445", [])
            .unwrap();
        fails_with(&db, &key, "changed");
        c.execute(
            "UPDATE events SET name = '*.pkg.dev' WHERE dport = 5445",
            [],
        )
        .unwrap();
        assert!(store_report(&db, &key).ok());
        c.execute(
            "UPDATE events SET name = '*.pkg.dev' WHERE dport = 5446",
            [],
        )
        .unwrap();
        fails_with(&db, &key, "changed");
        c.execute("UPDATE events SET name = NULL WHERE dport = 5446", [])
            .unwrap();
        assert!(store_report(&db, &key).ok());
        // A deleted row; then the retention row itself.
        c.execute("DELETE FROM events WHERE dport = 5444", [])
            .unwrap();
        fails_with(&db, &key, "missing");
        c.execute("DELETE FROM changes WHERE detail LIKE '%retention%'", [])
            .unwrap();
        fails_with(&db, &key, "deleted");
        drop(store);
    }

    fn store_report(db: &Path, key: &VerifyKey) -> Report {
        store(db, key, None).unwrap()
    }

    fn fails_with(db: &Path, key: &VerifyKey, why: &str) {
        let r = store_report(db, key);
        assert!(
            r.failure.as_deref().unwrap_or("").contains(why),
            "{why}: {r}"
        );
    }
}
