//! DNS answers as the kernel reads them (`bulkhead_common::dns`, the code
//! `bh_dns_ingress` runs): any bytes, as the first bytes of a UDP payload.
//! The reader must never index outside its buffer, every record must end
//! past where it starts and inside the answer, and the question's suffix
//! hashes must be the hashes of the names the agent would store for them.

#![no_main]

use bulkhead_common::dns::{self, DNS_BUF, MAX_ANSWERS, Scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len().min(DNS_BUF);
    let mut s = Box::new(Scratch::new());
    s.buf[..len].copy_from_slice(&data[..len]);
    let Some(q) = dns::question_hashed(&mut s, len) else {
        return;
    };
    assert!(q.labels >= 1 && q.next <= len);
    // The name, read back in dotted form, hashes as the kernel hashed it.
    let mut labels = Vec::new();
    let mut pos = 12;
    loop {
        let l = s.buf[pos] as usize;
        if l == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(&s.buf[pos + 1..pos + 1 + l]).into_owned());
        pos += 1 + l;
    }
    assert_eq!(labels.len(), q.labels);
    let valid = labels.iter().all(|l| !l.contains('.') && l.is_ascii());
    if valid {
        for i in 0..q.labels {
            let suffix = labels[q.labels - 1 - i..].join(".");
            assert_eq!(Some(s.hashes[i]), dns::name_hash(&suffix), "{suffix}");
        }
    }
    let mut at = q.next;
    for _ in 0..usize::from(q.answers).min(MAX_ANSWERS) {
        let Some(r) = dns::record(&s.buf, len, at) else {
            break;
        };
        assert!(r.next > at && r.next <= len, "{} -> {} of {len}", at, r.next);
        at = r.next;
    }
});
