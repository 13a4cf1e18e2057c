//! The proxy-wasm entry points Envoy calls, without the SDK's per-stream bookkeeping.
//!
//! The SDK's dispatcher needs three calls into V8 per request: create the stream's
//! context, its request headers, delete the context. The filter decides everything in
//! `on_request_headers` and keeps no per-stream state, so one call is enough. These entry
//! points are exported as `chronoguard_on_*`; `cargo xtask build-filter` removes the SDK's
//! `proxy_on_*` exports (among them `proxy_on_context_create` and `proxy_on_delete`, which
//! Envoy then never calls: proxy-wasm-cpp-host leaves in-VM state to the module when
//! `proxy_on_context_create` is absent) and renames these to `proxy_on_*`. The SDK still
//! provides the host calls, `proxy_on_memory_allocate` and `_initialize`.
//!
//! Root contexts carry no state either: the latest configuration this VM accepted decides
//! every request (`root::current`), the audit buffer and stats are VM-wide, and any root
//! context's tick flushes them.

#![allow(unsafe_code)] // `export_name`, and one call into the SDK's dispatcher.

use crate::{http, root, vm};
use proxy_wasm::types::Action;

unsafe extern "C" {
    /// The SDK's own export: forgets the callout it recorded when the audit batch was
    /// dispatched (it finds no context of its own to deliver it to).
    #[link_name = "proxy_on_http_call_response"]
    fn sdk_on_http_call_response(
        context_id: u32,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    );
}

#[unsafe(export_name = "chronoguard_on_vm_start")]
pub extern "C" fn on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[unsafe(export_name = "chronoguard_on_configure")]
pub extern "C" fn on_configure(root_context_id: u32, _plugin_configuration_size: usize) -> bool {
    root::configure(root_context_id)
}

#[unsafe(export_name = "chronoguard_on_tick")]
pub extern "C" fn on_tick(_root_context_id: u32) {
    let warmed = root::warm();
    let state = vm::state();
    let mut state = state.borrow_mut();
    let metrics = &mut state.metrics;
    metrics.add(
        metrics.memo_warmed,
        i64::try_from(warmed).unwrap_or(i64::MAX),
    );
    state.tick();
}

#[unsafe(export_name = "chronoguard_on_http_call_response")]
pub extern "C" fn on_http_call_response(
    context_id: u32,
    token_id: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    root::callout_response(token_id);
    // SAFETY: the SDK's `#[no_mangle]` entry point, linked into this module; it only
    // removes `token_id` from its callout map.
    unsafe { sdk_on_http_call_response(context_id, token_id, num_headers, body_size, num_trailers) }
}

#[unsafe(export_name = "chronoguard_on_request_headers")]
pub extern "C" fn on_request_headers(
    _context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> Action {
    http::on_request_headers(root::current())
}
