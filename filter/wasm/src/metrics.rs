//! Envoy stats the filter defines (visible as `wasmcustom.chronoguard.*` in `/stats` and
//! `/stats/prometheus`). Counters are aggregated by Envoy across worker VMs; the buffered
//! gauge is moved by deltas so it sums across VMs too.
//!
//! The request path only adds to VM-local deltas; [`Metrics::flush`] hands them to Envoy
//! from the root context's tick, so a request costs no stats hostcalls.

use crate::host;
use proxy_wasm::types::MetricType;

#[derive(Debug, Default)]
pub struct Metrics {
    pub allow: Option<u32>,
    pub deny: Option<u32>,
    pub evaluation_errors: Option<u32>,
    pub not_configured: Option<u32>,
    pub config_rejected: Option<u32>,
    pub memo_hits: Option<u32>,
    /// Memoised decisions taken ahead of their expiry on the tick (the requests after a
    /// time boundary then count as memo hits).
    pub memo_warmed: Option<u32>,
    /// Requests whose peer (certificate digest, subject, address) was read from Envoy's
    /// properties rather than from the per-connection cache: about one per connection.
    pub peer_reads: Option<u32>,
    /// Requests carrying an `x-chronoguard-peer` header without this Envoy's token (a
    /// client's own, or a listener without the header mutation): their peer was read
    /// from the connection, as always without the header. Not logged per request: a
    /// client could flood the log.
    pub peer_header_ignored: Option<u32>,
    pub rate_limit_errors: Option<u32>,
    pub audit_sent: Option<u32>,
    pub audit_dropped: Option<u32>,
    pub audit_retried: Option<u32>,
    pub audit_buffered: Option<u32>,
    pub config_version: Option<u32>,
    pub evaluation_us: Option<u32>,
    /// `chronoguard.reason.<outcome>.<reason>`, defined on first use.
    by_reason: Vec<(bool, String, Option<u32>)>,
    /// Deltas not yet handed to Envoy, by metric id.
    pending: Vec<(u32, i64)>,
}

// === impl Metrics ===

impl Metrics {
    pub fn define() -> Self {
        let counter = |name: &str| host::define(MetricType::Counter, name);
        let gauge = |name: &str| host::define(MetricType::Gauge, name);
        Self {
            allow: counter("chronoguard.decisions_allow"),
            deny: counter("chronoguard.decisions_deny"),
            evaluation_errors: counter("chronoguard.evaluation_errors"),
            not_configured: counter("chronoguard.decisions_not_configured"),
            config_rejected: counter("chronoguard.config_rejected"),
            memo_hits: counter("chronoguard.memo_hits"),
            memo_warmed: counter("chronoguard.memo_warmed"),
            peer_reads: counter("chronoguard.peer_reads"),
            peer_header_ignored: counter("chronoguard.peer_header_ignored"),
            rate_limit_errors: counter("chronoguard.rate_limit_errors"),
            audit_sent: counter("chronoguard.audit_sent"),
            audit_dropped: counter("chronoguard.audit_dropped"),
            audit_retried: counter("chronoguard.audit_retried"),
            audit_buffered: gauge("chronoguard.audit_buffered"),
            config_version: gauge("chronoguard.config_version"),
            evaluation_us: host::define(MetricType::Histogram, "chronoguard.evaluation_us"),
            by_reason: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Adds `delta` to a counter or gauge (handed to Envoy on the next flush).
    pub fn add(&mut self, metric: Option<u32>, delta: i64) {
        let Some(id) = metric else {
            return;
        };
        match self.pending.iter_mut().find(|(m, _)| *m == id) {
            Some((_, pending)) => *pending += delta,
            None => self.pending.push((id, delta)),
        }
    }

    /// Counts a decision by outcome and by reason code (custom reasons share one stat so
    /// a policy cannot create unbounded stat names).
    pub fn count(&mut self, allow: bool, reason: &str) {
        self.add(if allow { self.allow } else { self.deny }, 1);
        let reason = if reason.starts_with("custom:") {
            "custom"
        } else {
            reason
        };
        let found = self
            .by_reason
            .iter()
            .find(|(a, r, _)| *a == allow && r == reason)
            .map(|(_, _, id)| *id);
        let id = match found {
            Some(id) => id,
            None => {
                let outcome = if allow { "allow" } else { "deny" };
                let id = host::define(
                    MetricType::Counter,
                    &format!("chronoguard.reason.{outcome}.{reason}"),
                );
                self.by_reason.push((allow, reason.to_owned(), id));
                id
            }
        };
        self.add(id, 1);
    }

    /// Hands the pending deltas to Envoy.
    pub fn flush(&mut self) {
        for (id, delta) in self.pending.drain(..) {
            if delta != 0 {
                host::increment(Some(id), delta);
            }
        }
    }
}
