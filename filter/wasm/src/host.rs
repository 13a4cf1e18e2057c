//! The only module that calls proxy-wasm host functions.
//!
//! Every call returns `Option`/`Result` instead of unwrapping: a panic would take the VM,
//! and with it every request on this worker, down.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType};
use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

fn property_bytes(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok()?
}

pub fn property(path: &[&str]) -> Option<String> {
    String::from_utf8(property_bytes(path)?).ok()
}

/// The request headers the filter reads, borrowed from the [`HeaderMap`] unless a value
/// was not UTF-8 (then read lossily).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestHeaders<'a> {
    pub authority: Cow<'a, str>,
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    /// The first `user-agent`.
    pub user_agent: Cow<'a, str>,
    /// The first `x-request-id`, as sent (the decision id if it is a UUID:
    /// `filter_core::decision::decision_id`).
    pub request_id: &'a [u8],
    /// The first `x-chronoguard-peer` (`filter_core::input::PEER_HEADER`), as sent.
    pub peer: &'a [u8],
}

/// The request's header map as the host serialised it, owned by this module.
pub struct HeaderMap(Vec<u8>);

impl HeaderMap {
    /// The six headers the filter reads, parsed in place.
    pub fn request_headers(&self) -> RequestHeaders<'_> {
        parse_request_headers(&self.0)
    }
}

#[link(wasm_import_module = "env")]
#[allow(unsafe_code)]
unsafe extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> proxy_wasm::types::Status;

    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> proxy_wasm::types::Status;
}

/// All request headers in one host call (every call and every returned buffer is a trip
/// across the V8 boundary), to be parsed in place ([`HeaderMap::request_headers`]). The
/// SDK's `get_map` is not used on the request path: it allocates two strings per header
/// and panics on a header value that is not UTF-8, which Envoy lets through (obs-text);
/// here such a value is read lossily.
#[allow(unsafe_code)]
pub fn request_header_map() -> HeaderMap {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through this module's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size`, forgotten), or nothing;
    // `host_buffer` takes it back.
    let map = unsafe {
        let status = proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size);
        host_buffer(status, data, size)
    };
    HeaderMap(map.unwrap_or_default())
}

/// The buffer a host call returned, taken back so it is freed when dropped; `None` when
/// the call failed or returned nothing.
///
/// # Safety
/// With `status` Ok and `data` not null, `data` must be a buffer of `size` bytes the host
/// allocated through this module's `proxy_on_memory_allocate` (a `Vec<u8>` of capacity
/// `size`, forgotten) and handed over.
#[allow(unsafe_code)]
unsafe fn host_buffer(
    status: proxy_wasm::types::Status,
    data: *mut u8,
    size: usize,
) -> Option<Vec<u8>> {
    if status != proxy_wasm::types::Status::Ok || data.is_null() {
        return None;
    }
    // SAFETY: the caller's contract.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// The raw headers' names as patterns (the names live in `filter_core`).
const REQUEST_ID: &[u8] = filter_core::decision::REQUEST_ID_HEADER.as_bytes();
const PEER: &[u8] = filter_core::input::PEER_HEADER.as_bytes();

/// Reads the proxy-wasm serialized header map (`u32` count, `count` pairs of `u32`
/// lengths, then each name and value followed by a NUL); a malformed map yields what was
/// read before the fault.
fn parse_request_headers(map: &[u8]) -> RequestHeaders<'_> {
    let mut headers = RequestHeaders::default();
    let u32_at = |at: usize| -> Option<usize> {
        let bytes = map.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    };
    let Some(count) = u32_at(0) else {
        return headers;
    };
    let mut at = count.saturating_mul(8).saturating_add(4);
    for n in 0..count {
        let (Some(name_len), Some(value_len)) = (u32_at(4 + n * 8), u32_at(8 + n * 8)) else {
            break;
        };
        let name_end = at.saturating_add(name_len);
        let value_at = name_end.saturating_add(1);
        let value_end = value_at.saturating_add(value_len);
        let (Some(name), Some(value)) = (map.get(at..name_end), map.get(value_at..value_end))
        else {
            break;
        };
        at = value_end.saturating_add(1);
        let raw = match name {
            REQUEST_ID => Some(&mut headers.request_id),
            PEER => Some(&mut headers.peer),
            _ => None,
        };
        if let Some(raw) = raw {
            if raw.is_empty() {
                *raw = value;
            }
            continue;
        }
        let slot = match name {
            b":authority" => &mut headers.authority,
            b":method" => &mut headers.method,
            b":path" => &mut headers.path,
            b"user-agent" if headers.user_agent.is_empty() => &mut headers.user_agent,
            _ => continue,
        };
        // `from_utf8` checks ASCII a word at a time; the lossy reader goes byte by byte.
        *slot = match std::str::from_utf8(value) {
            Ok(value) => Cow::Borrowed(value),
            Err(_) => String::from_utf8_lossy(value),
        };
    }
    headers
}

/// The downstream connection's id (a `uint`, 8 little-endian bytes), read on every
/// request. Envoy's top-level `connection_id` property is the same id as `connection.id`,
/// read directly: `connection.id` first builds the `connection` map in an arena, then
/// looks `id` up in it (`perf` put the host call at ≈ 1.7–2.2 µs, BENCHMARKS.md). The path
/// is written here once, where the SDK would serialise it into a new buffer per call.
#[allow(unsafe_code)]
pub fn connection_id() -> Option<u64> {
    const PATH: &[u8] = b"connection_id";
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: `PATH` outlives the call; the host writes a buffer it allocated through
    // this module's `proxy_on_memory_allocate`, or nothing.
    let bytes = unsafe {
        let status = proxy_get_property(PATH.as_ptr(), PATH.len(), &mut data, &mut size);
        host_buffer(status, data, size)
    }?;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
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

/// Makes host calls act for another live context of this VM; `false` if it is gone.
pub fn set_effective_context(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (name, value) in pairs {
            out.extend((name.len() as u32).to_le_bytes());
            out.extend((value.len() as u32).to_le_bytes());
        }
        for (name, value) in pairs {
            out.extend(name.as_bytes());
            out.push(0);
            out.extend(*value);
            out.push(0);
        }
        out
    }

    #[test]
    fn reads_the_six_headers_and_keeps_the_first_user_agent_request_id_and_peer() {
        let map = serialize(&[
            ("x-chronoguard-peer", b"token:7"),
            ("x-request-id", b"5c8fa7b3-e2de-4161-b400-35d634e279c3"),
            ("x-chronoguard-peer", b"token:8"),
            ("x-request-id", b"second"),
            (":authority", b"api.example.com:443"),
            (":path", b"/v1?q=1"),
            (":method", b"GET"),
            ("x-other", b"ignored"),
            ("user-agent", b"first"),
            ("user-agent", b"second"),
        ]);
        assert_eq!(
            parse_request_headers(&map),
            RequestHeaders {
                authority: "api.example.com:443".into(),
                method: "GET".into(),
                path: "/v1?q=1".into(),
                user_agent: "first".into(),
                request_id: b"5c8fa7b3-e2de-4161-b400-35d634e279c3",
                peer: b"token:7",
            }
        );
    }

    #[test]
    fn a_value_that_is_not_utf8_is_read_lossily() {
        let map = serialize(&[(":authority", b"a.example"), ("user-agent", b"bot\xff/1")]);
        let headers = parse_request_headers(&map);
        assert_eq!(headers.authority, "a.example");
        assert_eq!(headers.user_agent, "bot\u{fffd}/1");
    }

    #[test]
    fn a_malformed_map_yields_what_was_read_and_never_panics() {
        let map = serialize(&[(":authority", b"a.example"), (":path", b"/x")]);
        for cut in 0..map.len() {
            let _ = parse_request_headers(&map[..cut]);
        }
        let mut lying = map.clone();
        lying[0] = 200; // claims 200 pairs
        assert_eq!(parse_request_headers(&lying), RequestHeaders::default());
        assert_eq!(parse_request_headers(&[]), RequestHeaders::default());
    }
}
