//! The only module that calls proxy-wasm host functions.
//!
//! Every call returns `Option`/`Result` instead of unwrapping: a panic would take the VM,
//! and with it every request on this worker, down.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType};
use std::time::{Duration, UNIX_EPOCH};

pub fn property(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(bytes).ok()
}

/// All request headers in one host call (cheaper than one call per header: every call
/// and every returned buffer is a trip across the V8 boundary).
pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
}

pub fn set_request_header(name: &str, value: &str) {
    if hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)).is_err() {
        log(LogLevel::Warn, "cannot set request header");
    }
}

pub fn send_response(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if hostcalls::send_http_response(status, headers, Some(body)).is_err() {
        log(LogLevel::Error, "cannot send local reply");
    }
}

/// Envoy's clock (not the guest's), nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn set_tick_period(period: Duration) {
    if hostcalls::set_tick_period(period).is_err() {
        log(LogLevel::Error, "cannot set tick period");
    }
}

pub fn dispatch_post(
    cluster: &str,
    authority: &str,
    path: &str,
    token: &str,
    body: &[u8],
    timeout: Duration,
) -> Option<u32> {
    let auth = format!("Bearer {token}");
    let headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    match hostcalls::dispatch_http_call(cluster, headers, Some(body), vec![], timeout) {
        Ok(token) => Some(token),
        Err(status) => {
            log(
                LogLevel::Warn,
                &format!("audit callout to cluster {cluster} not dispatched: {status:?}"),
            );
            None
        }
    }
}

/// The `:status` of the callout response being delivered, if any (none on timeout or reset).
pub fn callout_status() -> Option<u32> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
}

pub fn configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
}

/// A shared-data value and its CAS token (shared by all worker VMs of this Envoy).
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), ()> {
    hostcalls::get_shared_data(key).map_err(|_| ())
}

/// Sets a shared-data value if its CAS token is still `cas`; `Ok(false)` on a CAS
/// mismatch (another worker updated it first).
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, ()> {
    match hostcalls::set_shared_data(key, Some(value), cas) {
        Ok(()) => Ok(true),
        Err(proxy_wasm::types::Status::CasMismatch) => Ok(false),
        Err(_) => Err(()),
    }
}

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

pub fn define(metric_type: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(metric_type, name).ok()
}

pub fn increment(metric: Option<u32>, offset: i64) {
    if let Some(id) = metric {
        let _ = hostcalls::increment_metric(id, offset);
    }
}

pub fn record(metric: Option<u32>, value: u64) {
    if let Some(id) = metric {
        let _ = hostcalls::record_metric(id, value);
    }
}
