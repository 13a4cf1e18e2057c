//! State shared by all contexts of one worker VM: the audit buffer and its sender.

use crate::host;
use crate::metrics::Metrics;
use filter_core::audit::{AuditBuffer, AuditRecord, IdGenerator};
use filter_core::config::{AuditSink, FastHash};
use filter_core::data::EntryCache;
use filter_core::delta::Retained;
use filter_core::input::{MIN_PEER_TOKEN, PEER_TOKEN_ENV, peer_connection, source_ip};
use proxy_wasm::types::LogLevel;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;
use std::time::Duration;

/// Records kept before any configuration names a sink.
const DEFAULT_CAPACITY: usize = 10_000;
/// Longest pause between retries of a failing sink.
const MAX_BACKOFF_NS: u64 = 30_000_000_000;

/// What a connection says about its peer: the verified certificate's digest (lower-case
/// hex; empty without one), its subject, and the peer's IP.
#[derive(Clone, Default)]
pub struct Peer {
    pub fingerprint: String,
    pub subject: String,
    pub source_ip: String,
}

/// Peers by downstream connection id: a connection's peer never changes, so a request on
/// a kept-alive connection reads the digest and the address once per connection.
/// Certificate subjects (only audited) are kept by digest, read once per certificate.
/// Both are bounded: cleared when full.
///
/// The connection id itself comes from the `x-chronoguard-peer` header when the listener
/// writes it with this Envoy's token (`filter_core::input::peer_connection`): no host
/// call. Otherwise it is read from Envoy (the `connection_id` property, one host call).
pub struct PeerCache {
    by_connection: HashMap<u64, Rc<Peer>, FastHash>,
    subjects: HashMap<String, String>,
    /// The token the listener's header carries (`CHRONOGUARD_PEER_TOKEN` in Envoy's
    /// environment, passed to the VM); empty: the header is never believed.
    token: Box<[u8]>,
}

/// Connections (and certificates) remembered per VM before the cache starts over.
const PEER_CACHE_SIZE: usize = 4_096;

/// How the current request's peer was found.
pub struct PeerLookup {
    pub peer: Rc<Peer>,
    /// Read from Envoy's properties: the connection was not cached.
    pub read: bool,
    /// The request carried an `x-chronoguard-peer` header without this Envoy's token.
    pub header_ignored: bool,
}

impl PeerCache {
    fn new() -> Self {
        let token = match std::env::var(PEER_TOKEN_ENV) {
            Ok(token) if token.len() >= MIN_PEER_TOKEN => token.into_bytes().into(),
            Ok(_) => {
                host::log(
                    LogLevel::Error,
                    &format!(
                        "{PEER_TOKEN_ENV} is shorter than {MIN_PEER_TOKEN} bytes and is not used: \
                         peers are read from the connection"
                    ),
                );
                Box::default()
            }
            Err(_) => Box::default(),
        };
        Self {
            by_connection: HashMap::default(),
            subjects: HashMap::new(),
            token,
        }
    }

    /// The peer of the connection the current request arrived on; `header` is the
    /// request's `x-chronoguard-peer`.
    pub fn peer(&mut self, header: &[u8]) -> PeerLookup {
        let named = peer_connection(header, &self.token);
        let header_ignored = named.is_none() && !header.is_empty();
        let connection = named.or_else(host::connection_id);
        if let Some(peer) = connection.and_then(|id| self.by_connection.get(&id)) {
            return PeerLookup {
                peer: Rc::clone(peer),
                read: false,
                header_ignored,
            };
        }
        let mut fingerprint =
            host::property(&["connection", "sha256_peer_certificate_digest"]).unwrap_or_default();
        fingerprint.make_ascii_lowercase();
        let source_ip = source_ip(&host::property(&["source", "address"]).unwrap_or_default());
        let subject = self.subject(&fingerprint);
        let peer = Rc::new(Peer {
            fingerprint,
            subject,
            source_ip,
        });
        if let Some(id) = connection {
            if self.by_connection.len() >= PEER_CACHE_SIZE {
                self.by_connection.clear();
            }
            self.by_connection.insert(id, Rc::clone(&peer));
        }
        PeerLookup {
            peer,
            read: true,
            header_ignored,
        }
    }

    /// The subject of the peer certificate whose digest is `fingerprint` (empty without
    /// a certificate).
    fn subject(&mut self, fingerprint: &str) -> String {
        if fingerprint.is_empty() {
            return String::new();
        }
        if let Some(subject) = self.subjects.get(fingerprint) {
            return subject.clone();
        }
        let subject =
            host::property(&["connection", "subject_peer_certificate"]).unwrap_or_default();
        if self.subjects.len() >= PEER_CACHE_SIZE {
            self.subjects.clear();
        }
        self.subjects
            .insert(fingerprint.to_owned(), subject.clone());
        subject
    }
}

pub struct VmState {
    pub ids: IdGenerator,
    pub peers: PeerCache,
    /// Prepared bundle entries of the last configuration (`filter_core::data::EntryCache`).
    pub entries: EntryCache,
    /// The version whose entries `entries` holds (none while a load is under way or
    /// after one failed): a delta against it is compiled from what it lists.
    pub entries_at: Option<String>,
    /// The agents and policies of the last configuration: the base of the next delta.
    pub retained: Option<Retained>,
    pub metrics: Metrics,
    audit: AuditBuffer,
    sink: Option<AuditSink>,
    /// Token and dispatch time of the callout carrying the in-flight batch.
    pending: Option<(u32, u64)>,
    backoff_ns: u64,
    next_attempt_ns: u64,
    /// When the tick next sends audit: every flush interval (ticks may come more often).
    next_tick_flush_ns: u64,
}

thread_local! {
    static VM: Rc<RefCell<VmState>> = Rc::new(RefCell::new(VmState::new()));
}

/// The state of the VM this thread runs.
pub fn state() -> Rc<RefCell<VmState>> {
    VM.with(Rc::clone)
}

// === impl VmState ===

impl VmState {
    fn new() -> Self {
        let prefix = RandomState::new().hash_one(host::now_ns());
        Self {
            ids: IdGenerator::new(prefix),
            peers: PeerCache::new(),
            entries: EntryCache::default(),
            entries_at: None,
            retained: None,
            metrics: Metrics::define(),
            audit: AuditBuffer::new(DEFAULT_CAPACITY),
            sink: None,
            pending: None,
            backoff_ns: 0,
            next_attempt_ns: 0,
            next_tick_flush_ns: 0,
        }
    }

    /// Counts a decision in the stats.
    pub fn count_decision(&mut self, decision: &filter_core::decision::Decision) {
        self.metrics.count(decision.allow, &decision.reason);
    }

    /// A configuration named its sink: later flushes use it.
    pub fn set_sink(&mut self, sink: Option<AuditSink>) {
        if let Some(sink) = &sink {
            self.audit.set_capacity(sink.max_buffered);
        }
        self.sink = sink;
    }

    pub fn record(&mut self, record: &AuditRecord<&str>) {
        let dropped = self.audit.push(record);
        self.metrics.add(self.metrics.audit_buffered, 1);
        if dropped > 0 {
            self.metrics.add(self.metrics.audit_dropped, dropped as i64);
            self.metrics
                .add(self.metrics.audit_buffered, -(dropped as i64));
            if self.audit.dropped_total().is_power_of_two() {
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "audit buffer full: {} records dropped so far on this worker",
                        self.audit.dropped_total()
                    ),
                );
            }
        }
    }

    /// The root context's tick: hands stats to Envoy, and sends audit if due, once per
    /// flush interval (the tick may be shorter: `root::warm`).
    pub fn tick(&mut self) {
        self.metrics.flush();
        let now = host::now_ns();
        if now >= self.next_tick_flush_ns {
            let every = self.sink.as_ref().map_or(0, |s| s.flush_interval_ms);
            self.next_tick_flush_ns = now.saturating_add(every.saturating_mul(1_000_000));
            self.flush(false);
        }
    }

    /// Sends the next batch if the sink is idle and due. Called from ticks and responses.
    pub fn flush(&mut self, force: bool) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        let now = host::now_ns();
        if let Some((_, sent_at)) = self.pending {
            // A callout whose response never reached us (its root context went away) is
            // treated as failed after twice its timeout; the batch keeps its id.
            if now.saturating_sub(sent_at) < 2 * sink.timeout_ms * 1_000_000 {
                return;
            }
            self.pending = None;
            self.failed(&sink, now);
        }
        if !force && now < self.next_attempt_ns {
            return;
        }
        let ids = &mut self.ids;
        let Some(batch) = self.audit.next_batch(sink.batch_size, || ids.next_id()) else {
            return;
        };
        // The records were serialised when queued: this only joins them.
        let body = batch.body();
        let timeout = Duration::from_millis(sink.timeout_ms);
        match host::dispatch_post(
            &sink.cluster,
            &sink.authority,
            &sink.path,
            &sink.token,
            &body,
            timeout,
        ) {
            Some(token) => self.pending = Some((token, now)),
            None => self.failed(&sink, now),
        }
    }

    /// Whether a callout response with this token belongs to the in-flight batch.
    pub fn owns(&self, token: u32) -> bool {
        matches!(self.pending, Some((t, _)) if t == token)
    }

    /// The callout for the in-flight batch completed with this HTTP status (none: timeout
    /// or reset).
    pub fn completed(&mut self, status: Option<u32>) {
        self.pending = None;
        let Some(sink) = self.sink.clone() else {
            return;
        };
        let now = host::now_ns();
        match status {
            Some(200..=299) => {
                let sent = self.audit.acknowledge();
                self.metrics.add(self.metrics.audit_sent, sent as i64);
                self.metrics
                    .add(self.metrics.audit_buffered, -(sent as i64));
                self.backoff_ns = 0;
                self.next_attempt_ns = 0;
                // Keep draining while full batches are waiting.
                if self.audit.queued() >= sink.batch_size {
                    self.flush(true);
                }
            }
            // Refused for its content: retrying it as it is would block every later
            // record. Split it and send the halves now; a refused single record is
            // dropped and counted.
            Some(status @ (400 | 413 | 422)) => {
                let ids = &mut self.ids;
                let dropped = self.audit.refused(|| ids.next_id());
                if dropped > 0 {
                    self.metrics.add(self.metrics.audit_dropped, dropped as i64);
                    self.metrics
                        .add(self.metrics.audit_buffered, -(dropped as i64));
                    host::log(
                        LogLevel::Error,
                        &format!(
                            "audit record refused by the control plane (status {status}); dropped ({} dropped so far on this worker)",
                            self.audit.dropped_total()
                        ),
                    );
                } else {
                    host::log(
                        LogLevel::Warn,
                        &format!("audit batch refused (status {status}); sending it in halves"),
                    );
                }
                self.metrics.add(self.metrics.audit_retried, 1);
                self.flush(true);
            }
            // Unreachable, overloaded, timed out, or a credential the next configuration
            // may fix: the same batch again, with backoff.
            _ => {
                host::log(
                    LogLevel::Warn,
                    &format!("audit batch not accepted (status {status:?}); will retry"),
                );
                self.failed(&sink, now);
            }
        }
    }

    fn failed(&mut self, sink: &AuditSink, now: u64) {
        self.metrics.add(self.metrics.audit_retried, 1);
        let base = sink.flush_interval_ms * 1_000_000;
        self.backoff_ns = (self.backoff_ns.saturating_mul(2)).clamp(base, MAX_BACKOFF_NS);
        self.next_attempt_ns = now + self.backoff_ns;
    }
}
