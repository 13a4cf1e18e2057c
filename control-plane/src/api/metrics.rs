//! Prometheus metrics of the REST API at `/metrics` (text exposition format 0.0.4):
//! requests and their latency by route template, method and status, the database pool,
//! the published bundle version, the connected Envoys and audit storage maintenance.
//!
//! Labels are route templates (`/api/v1/agents/{id}`), never raw paths, so the series
//! stay bounded and carry no ids. The endpoint holds no tenant data and needs no token;
//! expose it only where the scraper runs.

use crate::app::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Histogram bucket upper bounds, seconds.
const BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default, Clone)]
struct Series {
    count: u64,
    sum: f64,
    /// Cumulative counts per bound in [`BOUNDS`].
    buckets: [u64; BOUNDS.len()],
}

/// (route, method, status).
type Key = (String, String, u16);

type Registry = BTreeMap<Key, Series>;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Middleware (a `route_layer`, so the matched route template is known).
pub async fn track(route: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = route
        .map(|r| r.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    if let Ok(mut registry) = registry().lock() {
        let series = registry.entry((route, method, status)).or_default();
        series.count += 1;
        series.sum += elapsed;
        for (bucket, bound) in series.buckets.iter_mut().zip(BOUNDS) {
            if elapsed <= bound {
                *bucket += 1;
            }
        }
    }
    response
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    out.push_str(
        "# HELP chronoguard_http_requests_total REST API requests by route, method and status.\n\
         # TYPE chronoguard_http_requests_total counter\n",
    );
    let snapshot: Vec<(Key, Series)> = match registry().lock() {
        Ok(registry) => registry
            .iter()
            .map(|(key, series)| (key.clone(), series.clone()))
            .collect(),
        Err(_) => Vec::new(),
    };
    for ((route, method, status), Series { count, .. }) in &snapshot {
        let _ = writeln!(
            out,
            "chronoguard_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {count}",
            escape(route)
        );
    }
    out.push_str(
        "# HELP chronoguard_http_request_duration_seconds REST API latency by route, method and status.\n\
         # TYPE chronoguard_http_request_duration_seconds histogram\n",
    );
    for (
        (route, method, status),
        Series {
            count,
            sum,
            buckets,
        },
    ) in &snapshot
    {
        let labels = format!(
            "route=\"{}\",method=\"{method}\",status=\"{status}\"",
            escape(route)
        );
        for (bound, bucket) in BOUNDS.iter().zip(buckets) {
            let _ = writeln!(
                out,
                "chronoguard_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {bucket}"
            );
        }
        let _ = writeln!(
            out,
            "chronoguard_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}\n\
             chronoguard_http_request_duration_seconds_sum{{{labels}}} {sum}\n\
             chronoguard_http_request_duration_seconds_count{{{labels}}} {count}"
        );
    }
    let pool = &state.store.pool;
    let bundle = state.publisher.latest_version().unwrap_or(0);
    let _ = write!(
        out,
        "# HELP chronoguard_db_pool_connections Open database connections.\n\
         # TYPE chronoguard_db_pool_connections gauge\n\
         chronoguard_db_pool_connections {}\n\
         # HELP chronoguard_db_pool_idle_connections Idle database connections.\n\
         # TYPE chronoguard_db_pool_idle_connections gauge\n\
         chronoguard_db_pool_idle_connections {}\n\
         # HELP chronoguard_bundle_version The published policy bundle version (0: none yet).\n\
         # TYPE chronoguard_bundle_version gauge\n\
         chronoguard_bundle_version {bundle}\n\
         # HELP chronoguard_envoys_connected Envoys on an ECDS stream.\n\
         # TYPE chronoguard_envoys_connected gauge\n\
         chronoguard_envoys_connected {}\n\
         # HELP chronoguard_bundle_publishes_total Policy bundles published (pushed to Envoys).\n\
         # TYPE chronoguard_bundle_publishes_total counter\n\
         chronoguard_bundle_publishes_total {}\n\
         # HELP chronoguard_bundle_rebuild_failures_total Background rebuilds that failed (the last good bundle stays published): alert on any increase.\n\
         # TYPE chronoguard_bundle_rebuild_failures_total counter\n\
         chronoguard_bundle_rebuild_failures_total {}\n\
         # HELP chronoguard_ecds_nacks_total Policy bundles Envoys rejected (NACK).\n\
         # TYPE chronoguard_ecds_nacks_total counter\n\
         chronoguard_ecds_nacks_total {}\n",
        pool.size(),
        pool.num_idle(),
        state
            .registry
            .list(None)
            .iter()
            .filter(|e| e.connected_streams > 0)
            .count(),
        state
            .publisher
            .publishes
            .load(std::sync::atomic::Ordering::Relaxed),
        state
            .publisher
            .failures
            .load(std::sync::atomic::Ordering::Relaxed),
        state
            .registry
            .list(None)
            .iter()
            .map(|e| e.nacks_total)
            .sum::<u64>(),
    );
    let audit = &crate::audit::retention::COUNTERS;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let _ = write!(
        out,
        "# HELP chronoguard_audit_maintenance_runs_total Audit storage maintenance runs completed (start-up and periodic).\n\
         # TYPE chronoguard_audit_maintenance_runs_total counter\n\
         chronoguard_audit_maintenance_runs_total {}\n\
         # HELP chronoguard_audit_maintenance_failures_total Audit storage maintenance runs that failed (retried at the next run).\n\
         # TYPE chronoguard_audit_maintenance_failures_total counter\n\
         chronoguard_audit_maintenance_failures_total {}\n\
         # HELP chronoguard_audit_partitions_created_total Weekly audit partitions created (plain PostgreSQL).\n\
         # TYPE chronoguard_audit_partitions_created_total counter\n\
         chronoguard_audit_partitions_created_total {}\n\
         # HELP chronoguard_audit_rows_moved_total Audit rows moved out of the default partition into their week.\n\
         # TYPE chronoguard_audit_rows_moved_total counter\n\
         chronoguard_audit_rows_moved_total {}\n\
         # HELP chronoguard_audit_ranges_dropped_total Audit partitions or chunks dropped past retention.\n\
         # TYPE chronoguard_audit_ranges_dropped_total counter\n\
         chronoguard_audit_ranges_dropped_total {}\n\
         # HELP chronoguard_audit_retention_anchors_signed_total Checkpoints signed to anchor chains before a drop.\n\
         # TYPE chronoguard_audit_retention_anchors_signed_total counter\n\
         chronoguard_audit_retention_anchors_signed_total {}\n\
         # HELP chronoguard_audit_retention_refused_total Ranges kept past retention because a chain in them does not verify or cannot be anchored: alert on any increase.\n\
         # TYPE chronoguard_audit_retention_refused_total counter\n\
         chronoguard_audit_retention_refused_total {}\n\
         # HELP chronoguard_admin_audit_failures_total Committed admin changes that could not be appended to their tenant's audit chain after every retry: alert on any increase.\n\
         # TYPE chronoguard_admin_audit_failures_total counter\n\
         chronoguard_admin_audit_failures_total {}\n",
        load(&audit.runs),
        load(&audit.failures),
        load(&audit.partitions_created),
        load(&audit.rows_moved),
        load(&audit.ranges_dropped),
        load(&audit.anchors_signed),
        load(&audit.ranges_refused),
        load(&crate::audit::admin::FAILURES),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
