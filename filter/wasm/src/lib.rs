//! ChronoGuard's proxy-wasm filter for Envoy: thin glue around `filter-core`.
//!
//! One VM runs per Envoy worker thread. Per VM there is one [`vm::VmState`] (audit buffer,
//! id generator, metrics) shared by every root context of that VM, so records survive a
//! reconfiguration, and one current configuration, the latest the VM accepted
//! ([`root::current`]); Envoy enters the module through [`abi`].

mod abi;
mod host;
mod http;
mod metrics;
mod ratelimit;
mod root;
mod vm;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

// The SDK's entry point macro exports `_initialize` with `#[no_mangle]`.
#[allow(unsafe_code)]
mod entry {
    use super::*;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        std::panic::set_hook(Box::new(|info| {
            host::log(LogLevel::Critical, &format!("chronoguard panic: {info}"));
        }));
        // Only reached through the SDK's own entry points, i.e. an unprocessed module.
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Unprocessed) });
    }}
}
