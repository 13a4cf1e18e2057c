//! The root context: compiles each configuration once and hands it to HTTP contexts.

use crate::http::Request;
use crate::{host, vm};
use filter_core::config::{AuditSink, Mode, RawPluginConfig};
use filter_core::policy::CompiledPolicy;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// A configuration ready for requests.
pub struct Active {
    pub version: Rc<str>,
    pub mode: Mode,
    /// Present in [`Mode::Enforce`].
    pub policy: Option<CompiledPolicy>,
}

pub struct Root {
    context_id: u32,
    active: Option<Rc<RefCell<Active>>>,
}

// === impl Root ===

impl Root {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            active: None,
        }
    }

    /// Parses and compiles a configuration; returns it ready for requests, with its
    /// audit sink.
    fn load(&self, bytes: &[u8]) -> Result<(Active, Option<AuditSink>), String> {
        let config = RawPluginConfig::from_slice(bytes).map_err(|e| e.to_string())?;
        let policy = match (&config.mode, &config.bundle) {
            (Mode::Enforce, Some(bundle)) => {
                // This VM's entries of the previous configuration: a push only parses and
                // prepares the agents and policies that changed (on_configure runs
                // between requests on the worker thread).
                let state = vm::state();
                let mut state = state.borrow_mut();
                Some(
                    CompiledPolicy::compile_raw(bundle, &mut state.entries)
                        .map_err(|e| e.to_string())?,
                )
            }
            _ => None,
        };
        let active = Active {
            version: Rc::from(config.version.as_str()),
            mode: config.mode,
            policy,
        };
        Ok((active, config.audit))
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let state = vm::state();
        let mut state = state.borrow_mut();
        if state.owns(token) {
            state.completed(host::callout_status());
        }
    }

    fn on_done(&mut self) -> bool {
        // The VM-wide buffer outlives this root context; the next root context's ticks (or
        // this VM's remaining ones) keep flushing it. (The optimised module does not even
        // export `proxy_on_done`, which Envoy treats as this same answer: `xtask`.)
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = host::configuration().unwrap_or_default();
        let started = host::now_ns();
        let state = vm::state();
        match self.load(&bytes) {
            Ok((active, sink)) => {
                let elapsed_ms = host::now_ns().saturating_sub(started) / 1_000_000;
                host::log(
                    LogLevel::Info,
                    &format!(
                        "root {}: configuration {} loaded ({:?}, {} bytes, {elapsed_ms} ms)",
                        self.context_id,
                        active.version,
                        active.mode,
                        bytes.len()
                    ),
                );
                let mut state = state.borrow_mut();
                if let Ok(version) = active.version.parse::<u64>() {
                    host::record(state.metrics.config_version, version);
                }
                // The tick flushes stats and audit; without a sink, stats only, once a second.
                let period = sink.as_ref().map_or(1_000, |a| a.flush_interval_ms);
                if sink.is_some() {
                    state.set_sink(sink);
                }
                host::set_tick_period(Duration::from_millis(period));
                self.active = Some(Rc::new(RefCell::new(active)));
                crate::ratelimit::reset();
                true
            }
            Err(err) => {
                host::increment(state.borrow().metrics.config_rejected, 1);
                host::log(
                    LogLevel::Critical,
                    &format!("root {}: configuration refused: {err}", self.context_id),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        vm::state().borrow_mut().tick();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(self.active.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
