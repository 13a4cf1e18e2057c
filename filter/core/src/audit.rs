//! Audit records the filter emits per decision, and the bounded buffer that batches them.
//!
//! No hashing happens here: the control plane assigns sequence numbers and chains entries.
//! The batch JSON is a contract (`docs/contracts.md`).

use crate::decision::Decision;
use crate::input::RequestFacts;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Most records one batch may carry: the control plane refuses larger batches, and a
/// configuration asking for larger ones is refused at configure time.
pub const MAX_BATCH: usize = 10_000;

/// Largest request body the ingest endpoint accepts: `MAX_BATCH` records of up to
/// ~1.6 KB of JSON each.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// One decision, as sent to the control plane. Generic over its strings: the control
/// plane reads owned records (`AuditRecord`, i.e. `AuditRecord<String>`); the filter writes
/// `AuditRecord<&str>` straight from the request's facts and decision, copying nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord<S = String> {
    pub decision_id: S,
    /// Envoy's clock at the decision, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    pub tenant_id: Option<S>,
    pub agent_id: Option<S>,
    pub agent_fingerprint: S,
    pub agent_subject: S,
    pub domain: S,
    pub method: S,
    pub path: S,
    pub user_agent: S,
    pub source_ip: S,
    /// `allow` or `deny`.
    pub decision: S,
    pub reason: S,
    pub policy_id: Option<S>,
    pub config_version: S,
}

/// What the filter POSTs to the ingest endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBatch {
    /// Unique per batch; a retried batch keeps its id so it is stored once.
    pub batch_id: String,
    pub entries: Vec<AuditRecord>,
}

// === impl AuditRecord ===

impl<'a> AuditRecord<&'a str> {
    /// The record of a decision, borrowing the request's facts and the decision.
    pub fn of(
        decision_id: &'a str,
        facts: &'a RequestFacts<'a>,
        decision: &'a Decision,
        config_version: &'a str,
    ) -> Self {
        Self {
            decision_id,
            timestamp_ns: facts.unix_ns,
            tenant_id: decision.tenant_id.as_deref(),
            agent_id: decision.agent_id.as_deref(),
            agent_fingerprint: &facts.fingerprint,
            agent_subject: &facts.subject,
            domain: &facts.domain,
            method: &facts.method,
            path: &facts.path,
            user_agent: &facts.user_agent,
            source_ip: &facts.source_ip,
            decision: decision.outcome(),
            reason: &decision.reason,
            policy_id: decision.policy_id.as_deref(),
            config_version,
        }
    }
}

impl AuditRecord<&str> {
    /// Appends this record as JSON, byte for byte what `serde_json` writes for it
    /// (tested). The filter writes one per request: serde's field-by-field writer spent
    /// most of a request's guest time in V8 on escaping one byte at a time and on many
    /// small copies (each a call out of the compiled code), so strings that need no
    /// escaping, all of them in practice, are checked 8 bytes at a time and copied whole.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let opt = |out: &mut Vec<u8>, value: Option<&str>| match value {
            Some(value) => json_str(out, value),
            None => out.extend_from_slice(b"null"),
        };
        out.extend_from_slice(b"{\"decision_id\":");
        json_str(out, self.decision_id);
        out.extend_from_slice(b",\"timestamp_ns\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.timestamp_ns).as_bytes());
        out.extend_from_slice(b",\"tenant_id\":");
        opt(out, self.tenant_id);
        out.extend_from_slice(b",\"agent_id\":");
        opt(out, self.agent_id);
        out.extend_from_slice(b",\"agent_fingerprint\":");
        json_str(out, self.agent_fingerprint);
        out.extend_from_slice(b",\"agent_subject\":");
        json_str(out, self.agent_subject);
        out.extend_from_slice(b",\"domain\":");
        json_str(out, self.domain);
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method);
        out.extend_from_slice(b",\"path\":");
        json_str(out, self.path);
        out.extend_from_slice(b",\"user_agent\":");
        json_str(out, self.user_agent);
        out.extend_from_slice(b",\"source_ip\":");
        json_str(out, self.source_ip);
        out.extend_from_slice(b",\"decision\":");
        json_str(out, self.decision);
        out.extend_from_slice(b",\"reason\":");
        json_str(out, self.reason);
        out.extend_from_slice(b",\"policy_id\":");
        opt(out, self.policy_id);
        out.extend_from_slice(b",\"config_version\":");
        json_str(out, self.config_version);
        out.push(b'}');
    }
}

/// Appends `s` as a JSON string: copied whole between quotes when no byte of it needs
/// escaping, else written by `serde_json`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing a string into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether `bytes` hold a byte JSON escapes: a control character (below 0x20), `"` or
/// `\\`. Eight bytes at a time: a word has a byte below `n` (`n` ≤ 0x80) when
/// `(w - n·0x01…) & !w & 0x80…` is not zero, and a byte equal to `c` when `w ^ c·0x01…`
/// has a byte below 1.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u64| w.wrapping_sub(n * ONES) & !w & HIGH;
    let mut words = bytes.chunks_exact(8);
    let escape = words.by_ref().any(|word| {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        below(w, 0x20)
            | below(w ^ (u64::from(b'"') * ONES), 1)
            | below(w ^ (u64::from(b'\\') * ONES), 1)
            != 0
    });
    escape
        || words
            .remainder()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A batch taken from the queue: its id and its records, each already JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_id: String,
    pub entries: Vec<Vec<u8>>,
}

// === impl Batch ===

impl Batch {
    /// The request body: this batch as an [`AuditBatch`] in JSON, put together from the
    /// records' JSON (written when they were queued) without serialising them again.
    pub fn body(&self) -> Vec<u8> {
        let records: usize = self.entries.iter().map(Vec::len).sum();
        let mut body = Vec::with_capacity(records + self.entries.len() + 96);
        body.extend_from_slice(b"{\"batch_id\":");
        json_str(&mut body, &self.batch_id);
        body.extend_from_slice(b",\"entries\":[");
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(entry);
        }
        body.extend_from_slice(b"]}");
        body
    }
}

/// A bounded queue of records plus the batch in flight.
///
/// Each record is serialised when it is queued, so the work is spread over the requests
/// instead of landing on the tick that sends a batch (a batch of 1,000 records took
/// several milliseconds to write in V8, and requests waited for it). At most one batch is
/// in flight; it stays owned by the buffer until the control plane acknowledges it, and is
/// resent with the same id after a failure. When the queue is full the oldest queued
/// record is dropped and counted.
#[derive(Debug)]
pub struct AuditBuffer {
    queue: VecDeque<Vec<u8>>,
    capacity: usize,
    in_flight: Option<Batch>,
    dropped: u64,
}

// === impl AuditBuffer ===

impl AuditBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            in_flight: None,
            dropped: 0,
        }
    }

    /// Queues a record; returns how many records were dropped to make room (0 or 1).
    pub fn push(&mut self, record: &AuditRecord<&str>) -> u64 {
        // Sized for a typical record (≈ 550 bytes of JSON), so it is written without
        // growing the buffer.
        let mut json = Vec::with_capacity(768);
        record.write_json(&mut json);
        let mut dropped = 0;
        while self.buffered() >= self.capacity && self.queue.pop_front().is_some() {
            dropped += 1;
        }
        self.queue.push_back(json);
        self.dropped += dropped;
        dropped
    }

    /// Changes the bound; records beyond it are dropped (oldest first) on the next push.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// Records held: queued plus in flight.
    pub fn buffered(&self) -> usize {
        self.queue.len() + self.in_flight.as_ref().map_or(0, |b| b.entries.len())
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    pub fn in_flight(&self) -> Option<&Batch> {
        self.in_flight.as_ref()
    }

    /// Takes up to `max` queued records into a new in-flight batch, unless one is already
    /// in flight (then that one is returned again for a retry).
    pub fn next_batch(&mut self, max: usize, batch_id: impl FnOnce() -> String) -> Option<&Batch> {
        if self.in_flight.is_none() && !self.queue.is_empty() {
            let n = max.min(self.queue.len());
            let entries = self.queue.drain(..n).collect();
            self.in_flight = Some(Batch {
                batch_id: batch_id(),
                entries,
            });
        }
        self.in_flight.as_ref()
    }

    /// The in-flight batch was stored: forget it. Returns its size.
    pub fn acknowledge(&mut self) -> usize {
        self.in_flight.take().map_or(0, |b| b.entries.len())
    }

    /// The control plane refused the in-flight batch for what it holds (400 malformed,
    /// 413 too large, 422): sent again as it is, it would be refused forever and hold up
    /// every later record. Splits it instead: the first half stays in flight under a new
    /// id (nothing was stored under the old one), the second half goes back to the head
    /// of the queue, in order. A refused batch of one record is dropped and counted, so
    /// one bad record costs itself only. Returns how many records were dropped.
    pub fn refused(&mut self, batch_id: impl FnOnce() -> String) -> usize {
        let Some(batch) = self.in_flight.take() else {
            return 0;
        };
        let mut entries = batch.entries;
        if entries.len() <= 1 {
            self.dropped += entries.len() as u64;
            return entries.len();
        }
        let rest = entries.split_off(entries.len() / 2);
        for record in rest.into_iter().rev() {
            self.queue.push_front(record);
        }
        self.in_flight = Some(Batch {
            batch_id: batch_id(),
            entries,
        });
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(n: u64) -> RequestFacts<'static> {
        RequestFacts {
            unix_ns: n,
            domain: format!("d{n}.example").into(),
            ..RequestFacts::default()
        }
    }

    /// Queues record `n`.
    fn push(buffer: &mut AuditBuffer, n: u64) -> u64 {
        let (facts, decision) = (facts(n), Decision::fixed(true, "x"));
        buffer.push(&AuditRecord::of(&format!("d{n}"), &facts, &decision, "v1"))
    }

    /// Record `n` as the control plane reads it.
    fn record(n: u64) -> AuditRecord {
        let (facts, decision, id) = (facts(n), Decision::fixed(true, "x"), format!("d{n}"));
        let view = AuditRecord::of(&id, &facts, &decision, "v1");
        serde_json::from_value(serde_json::to_value(view).unwrap()).unwrap()
    }

    /// A batch as the control plane reads it.
    fn decode(batch: &Batch) -> AuditBatch {
        serde_json::from_slice(&batch.body()).unwrap()
    }

    #[test]
    fn the_body_is_an_audit_batch_of_the_queued_records() {
        let mut buffer = AuditBuffer::new(10);
        for n in 0..3 {
            push(&mut buffer, n);
        }
        let batch = decode(buffer.next_batch(10, || "b\"1".into()).unwrap());
        let want = AuditBatch {
            batch_id: "b\"1".into(),
            entries: (0..3).map(record).collect(),
        };
        assert_eq!(batch, want);
        assert_eq!(batch.entries[1].domain, "d1.example");
        assert_eq!(batch.entries[1].decision, "allow");
    }

    /// Every field, with strings that need escaping at every position of a word, and
    /// strings that do not: the writer's output is serde_json's, byte for byte.
    #[test]
    fn the_record_json_is_serde_json_byte_for_byte() {
        let mut strings: Vec<String> = vec![
            String::new(),
            "allowed-0.example".into(),
            "Mozilla/5.0 (X11; Linux x86_64) ünïcödé ☃".into(),
            "\u{7f}\u{80}".into(),
        ];
        for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', '\t'] {
            for at in 0..17 {
                let mut s: String = "abcdefghijklmnop".chars().take(at).collect();
                s.push(special);
                s.push_str("tail");
                strings.push(s);
            }
        }
        // Bytes just above and below the escaped ones.
        strings.push((0x1e_u8..0x7f).map(char::from).collect());
        let mut decision = Decision::fixed(true, "domain_allowed");
        for (n, s) in strings.iter().enumerate() {
            decision.policy_id = (n % 2 == 0).then(|| s.clone());
            decision.tenant_id = (n % 3 == 0).then(|| s.clone());
            let facts = RequestFacts {
                fingerprint: s.into(),
                subject: format!("CN={s}").into(),
                domain: s.into(),
                method: "GET".into(),
                path: format!("/{s}").into(),
                user_agent: s.into(),
                source_ip: "10.0.0.1".into(),
                unix_ns: u64::MAX - n as u64,
                ..RequestFacts::default()
            };
            let record = AuditRecord::of(s, &facts, &decision, s);
            let mut ours = Vec::new();
            record.write_json(&mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&record).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let mut buffer = AuditBuffer::new(3);
        for n in 0..5 {
            push(&mut buffer, n);
        }
        assert_eq!(buffer.dropped_total(), 2);
        let batch = decode(buffer.next_batch(10, || "b1".into()).unwrap());
        let ids: Vec<_> = batch.entries.iter().map(|r| r.timestamp_ns).collect();
        assert_eq!(ids, [2, 3, 4]);
    }

    #[test]
    fn refused_batches_split_until_the_bad_record_alone_is_dropped() {
        let mut buffer = AuditBuffer::new(100);
        for n in 0..5 {
            push(&mut buffer, n);
        }
        let mut ids = (0..).map(|i| format!("b{i}"));
        let first = decode(buffer.next_batch(4, || ids.next().unwrap()).unwrap());
        assert_eq!(first.entries.len(), 4);
        // Refused: records 0-1 go out again under a new id, 2-3 wait ahead of 4.
        assert_eq!(buffer.refused(|| ids.next().unwrap()), 0);
        let half = decode(buffer.in_flight().unwrap());
        assert_ne!(half.batch_id, first.batch_id);
        assert_eq!(half.entries, first.entries[..2].to_vec());
        assert_eq!(buffer.buffered(), 5);
        // Say record 1 is the bad one: 0-1 refused again, then 0 stored, then 1 dropped.
        assert_eq!(buffer.refused(|| ids.next().unwrap()), 0);
        assert_eq!(decode(buffer.in_flight().unwrap()).entries, vec![record(0)]);
        assert_eq!(buffer.acknowledge(), 1);
        assert_eq!(
            decode(buffer.next_batch(1, || ids.next().unwrap()).unwrap()).entries,
            vec![record(1)]
        );
        assert_eq!(buffer.refused(|| ids.next().unwrap()), 1);
        assert_eq!(buffer.dropped_total(), 1);
        // The rest follows in order, unharmed.
        let rest = decode(buffer.next_batch(10, || ids.next().unwrap()).unwrap());
        assert_eq!(rest.entries, vec![record(2), record(3), record(4)]);
        assert_eq!(buffer.acknowledge(), 3);
        assert_eq!(buffer.buffered(), 0);
        assert_eq!(
            buffer.refused(|| ids.next().unwrap()),
            0,
            "nothing in flight"
        );
    }

    #[test]
    fn in_flight_batch_is_retried_with_same_id_and_counts_against_capacity() {
        let mut buffer = AuditBuffer::new(3);
        push(&mut buffer, 0);
        push(&mut buffer, 1);
        assert_eq!(
            buffer.next_batch(10, || "b1".into()).unwrap().batch_id,
            "b1"
        );
        // Not acknowledged: the same batch comes back.
        assert_eq!(
            buffer.next_batch(10, || "b2".into()).unwrap().batch_id,
            "b1"
        );
        push(&mut buffer, 2);
        push(&mut buffer, 3); // capacity 3 with 2 in flight: drops record 2.
        assert_eq!(buffer.dropped_total(), 1);
        assert_eq!(buffer.acknowledge(), 2);
        let batch = buffer.next_batch(10, || "b3".into()).unwrap();
        assert_eq!(batch.batch_id, "b3");
        assert_eq!(batch.entries.len(), 1);
        assert_eq!(buffer.acknowledge(), 1);
        assert!(buffer.next_batch(10, || "b4".into()).is_none());
    }
}

/// Generates decision and batch ids that are unique across VMs and restarts: a random
/// 64-bit prefix drawn once per VM and a counter, formatted as a UUID.
#[derive(Debug)]
pub struct IdGenerator {
    /// The prefix as the id's first 19 characters, `pppppppp-pppp-pppp-`.
    prefix: Vec<u8>,
    counter: u64,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The hex digits of `value`'s `digits` lowest nibbles, most significant first.
fn hex_digits(value: u64, digits: u32) -> impl Iterator<Item = u8> {
    (0..digits).rev().map(move |n| {
        HEX.get(((value >> (n * 4)) & 0xf) as usize)
            .copied()
            .unwrap_or(b'0')
    })
}

// === impl IdGenerator ===

impl IdGenerator {
    pub fn new(prefix: u64) -> Self {
        let mut text = Vec::with_capacity(19);
        for (at, digit) in hex_digits(prefix, 16).enumerate() {
            if matches!(at, 8 | 12) {
                text.push(b'-');
            }
            text.push(digit);
        }
        text.push(b'-');
        Self {
            prefix: text,
            counter: 0,
        }
    }

    /// `pppppppp-pppp-pppp-cccc-cccccccccccc` (prefix, then counter, in hex). One per
    /// request: the prefix is written once, the counter's digits from a table (`format!`
    /// costs several times more in wasm).
    pub fn next_id(&mut self) -> String {
        self.counter = self.counter.wrapping_add(1);
        let mut id = Vec::with_capacity(36);
        id.extend_from_slice(&self.prefix);
        id.extend(hex_digits(self.counter >> 48, 4));
        id.push(b'-');
        id.extend(hex_digits(self.counter, 12));
        // Hex digits and dashes: always UTF-8.
        String::from_utf8(id).unwrap_or_default()
    }
}

#[cfg(test)]
mod id_tests {
    use super::IdGenerator;

    #[test]
    fn ids_are_uuid_shaped_and_distinct() {
        let mut ids = IdGenerator::new(0x0123_4567_89ab_cdef);
        let a = ids.next_id();
        let b = ids.next_id();
        assert_eq!(a, "01234567-89ab-cdef-0000-000000000001");
        assert_eq!(b, "01234567-89ab-cdef-0000-000000000002");
        let mut ids = IdGenerator::new(u64::MAX);
        ids.counter = 0xfedc_ba98_7654_3210 - 1;
        assert_eq!(ids.next_id(), "ffffffff-ffff-ffff-fedc-ba9876543210");
    }
}
