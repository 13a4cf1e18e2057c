//! Envoy stats the filter defines (visible under `wasmcustom.chronoguard_*` in
//! `/stats/prometheus`). Counters are aggregated by Envoy across worker VMs; the buffered
//! gauge is moved by deltas so it sums across VMs too.

use crate::host;
use proxy_wasm::types::MetricType;

#[derive(Debug, Default)]
pub struct Metrics {
    pub allow: Option<u32>,
    pub deny: Option<u32>,
    pub evaluation_errors: Option<u32>,
    pub not_configured: Option<u32>,
    pub config_rejected: Option<u32>,
    pub audit_sent: Option<u32>,
    pub audit_dropped: Option<u32>,
    pub audit_retried: Option<u32>,
    pub audit_buffered: Option<u32>,
    pub config_version: Option<u32>,
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
            audit_sent: counter("chronoguard.audit_sent"),
            audit_dropped: counter("chronoguard.audit_dropped"),
            audit_retried: counter("chronoguard.audit_retried"),
            audit_buffered: gauge("chronoguard.audit_buffered"),
            config_version: gauge("chronoguard.config_version"),
        }
    }
}
