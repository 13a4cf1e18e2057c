//! Configurations: each is compiled once per VM, and the latest accepted decides requests.

use crate::{host, vm};
use filter_core::config::{AuditSink, ConfigIndex, ConfigRead, Mode, RawBundle, RawPluginConfig};
use filter_core::data::{EntryCache, Validated};
use filter_core::delta::{Changes, Retained};
use filter_core::policy::{CompiledPolicy, PolicyError};
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::LogLevel;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// A configuration ready for requests.
pub struct Active {
    pub version: Rc<str>,
    pub mode: Mode,
    /// Present in [`Mode::Enforce`] (once [`Deferred`] is compiled, see [`current`]).
    pub policy: Option<CompiledPolicy>,
    deferred: Option<Deferred>,
}

/// A configuration accepted without compiling it whole (`CompiledPolicy::check_delta`):
/// compiled from the VM's kept entries when it first decides.
struct Deferred {
    timezones: Option<serde_json::Value>,
    /// What the check validated: agents, policies, module sets.
    validated_here: (usize, usize, usize),
}

impl Active {
    /// A configuration's version and mode with its compiled policy, and its audit sink.
    fn of(
        config: RawPluginConfig<'_>,
        policy: Option<CompiledPolicy>,
    ) -> (Self, Option<AuditSink>) {
        let active = Self {
            version: Rc::from(config.version.as_str()),
            mode: config.mode,
            policy,
            deferred: None,
        };
        (active, config.audit)
    }

    /// Agents, policies and module sets its load validated itself.
    fn validated_here(&self) -> (usize, usize, usize) {
        match (&self.policy, &self.deferred) {
            (Some(policy), _) => policy.validated_here(),
            (None, Some(deferred)) => deferred.validated_here,
            (None, None) => (0, 0, 0),
        }
    }
}

thread_local! {
    /// The latest configuration this VM accepted: it decides every request (`abi`).
    static CURRENT: RefCell<Option<Rc<RefCell<Active>>>> = const { RefCell::new(None) };
    /// The name of the plugin (filter instance) this VM serves, from its first
    /// configuration that can let requests through.
    static PLUGIN: RefCell<Serving> = const { RefCell::new(Serving::Nobody) };
}

/// The configuration that decides requests now (none before the first one: fail closed),
/// compiled first if it was accepted without ([`Deferred`]).
pub fn current() -> Option<Rc<RefCell<Active>>> {
    let active = accepted()?;
    if active.try_borrow().is_ok_and(|a| a.deferred.is_some())
        && let Ok(mut deferred) = active.try_borrow_mut()
    {
        compile_deferred(&mut deferred);
    }
    Some(active)
}

/// The configuration this VM accepted last, as it is.
fn accepted() -> Option<Rc<RefCell<Active>>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Compiles a configuration accepted without it from the entries this VM kept of it. A
/// failure (none seen: the check accepts only what compiles) leaves it without a policy,
/// so its requests are denied (`not_configured`); it is logged and counted.
fn compile_deferred(active: &mut Active) {
    let Some(deferred) = active.deferred.take() else {
        return;
    };
    let started = host::now_ns();
    let state = vm::state();
    let mut guard = state.borrow_mut();
    let compiled = match guard.retained.take() {
        Some(kept) if kept.version() == &*active.version => {
            let compiled = compile(&kept.bundle(deferred.timezones), &mut guard);
            guard.retained = Some(kept);
            compiled
        }
        kept => {
            guard.retained = kept;
            Err("this VM no longer holds its entries".to_owned())
        }
    };
    match compiled {
        Ok(policy) => {
            guard.entries_at = Some(active.version.to_string());
            active.policy = Some(policy);
            let elapsed_ms = host::now_ns().saturating_sub(started) as f64 / 1e6;
            host::log(
                LogLevel::Info,
                &format!(
                    "configuration {} compiled for its first decision ({elapsed_ms:.3} ms)",
                    active.version
                ),
            );
        }
        Err(err) => {
            host::increment(guard.metrics.config_rejected, 1);
            host::log(
                LogLevel::Critical,
                &format!(
                    "configuration {} could not be compiled: {err}; its requests are denied",
                    active.version
                ),
            );
        }
    }
}

/// The longest tick period: how often the tick decides ahead of time the memoised
/// decisions that expire soon. Short ticks spread that work thin between requests.
const WARM_TICK_MS: u64 = 100;

/// Memoised decisions decided ahead of time per tick at most (each a Rego evaluation,
/// ≈ 0.5–1 ms in V8): up to 1,200 decisions in use per time boundary are ready when it
/// comes (`CompiledPolicy::warm` paces them over the 30 s before it).
const WARM_PER_TICK: usize = 4;

thread_local! {
    /// The root context whose tick timer runs on this VM (the latest configured one).
    static TICKING: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Makes `root_context_id` the one root context of this VM with a tick timer. Envoy
/// re-arms a root context's tick timer for as long as the process lives, also after the
/// context is deleted (its tick handler finds no context, calls nobody and arms the timer
/// again), so each push used to leave one more timer firing every `WARM_TICK_MS` on every
/// VM: the worker's idle CPU grew by about 1.2 ms per second per 100 pushes (BENCHMARKS.md,
/// "Eighteenth session"). The previous root context is still alive while the next one is
/// configured (Envoy shuts the old plugin down after the new one is in place), so its timer
/// is stopped here, acting as that context. One timer is enough: a VM serves one filter
/// instance ([`admit`]) and every tick's work is VM-wide. Stopping it in `proxy_on_done`
/// instead would cost one more entry into V8 per request, because Envoy calls that export
/// for every stream too.
fn tick_only(root_context_id: u32, period: Duration) {
    host::set_tick_period(period);
    let Some(previous) = TICKING.replace(Some(root_context_id)) else {
        return;
    };
    if previous == root_context_id {
        return;
    }
    if host::set_effective_context(previous) {
        host::set_tick_period(Duration::ZERO);
        host::set_effective_context(root_context_id);
    } else {
        host::log(
            LogLevel::Warn,
            &format!(
                "root {root_context_id}: the previous root context {previous} is already gone; its tick timer keeps firing for nothing"
            ),
        );
    }
}

thread_local! {
    /// The tick period set with the configuration.
    static TICK_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(WARM_TICK_MS * 1_000_000) };
}

/// The tick's share of the memo: decides ahead of time the memoised decisions in use that
/// expire soon (a time boundary of the bundle), so the requests after it do not all run
/// regorus at once. Returns how many were decided.
pub fn warm() -> usize {
    let Some(active) = current() else {
        return 0;
    };
    let Ok(mut active) = active.try_borrow_mut() else {
        return 0;
    };
    match active.policy.as_mut() {
        Some(policy) => policy.warm(host::now_ns(), TICK_NS.get(), WARM_PER_TICK),
        None => 0,
    }
}

/// The proxy-wasm shared-data key of the agents and policies validated by this Envoy's
/// VMs (`filter_core::data::Validated`). Validation is this module's code, so the key
/// names the filter's version: VMs of another version validate for themselves.
const VALIDATED: &str = concat!("chronoguard.validated.", env!("CARGO_PKG_VERSION"));

/// The shared-data key of the index of the latest configuration a VM parsed in full
/// (`filter_core::config::ConfigIndex`): the VMs loading the same bytes next read their
/// entries through it instead of parsing the whole text.
const INDEX: &str = concat!("chronoguard.index.", env!("CARGO_PKG_VERSION"));

/// The shared-data key of the entries of the configuration the latest canary loaded
/// (`filter_core::delta::Retained::encode`): the base the next canary (a fresh VM per
/// push) applies a delta to. The `3` names the form (`Retained::encode`).
const STATE: &str = concat!("chronoguard.state.3.", env!("CARGO_PKG_VERSION"));

/// Parses and compiles a configuration; returns it ready for requests, with its audit
/// sink, and how it was read.
fn load(bytes: &[u8]) -> Result<(Active, Option<AuditSink>, ConfigRead), String> {
    let index = match host::shared_get(INDEX) {
        Ok((Some(index), _)) => ConfigIndex::decode_for(&index, Some(bytes.len())),
        _ => None,
    };
    let indexed = index
        .as_ref()
        .and_then(|index| RawPluginConfig::from_index(bytes, index));
    let read = if indexed.is_some() {
        ConfigRead::Indexed
    } else {
        ConfigRead::Parsed
    };
    let config = match indexed {
        Some(config) => config,
        None => RawPluginConfig::from_slice(bytes).map_err(|e| e.to_string())?,
    };
    if config.base.is_some() {
        return load_delta(config);
    }
    let policy = match (&config.mode, &config.bundle) {
        (Mode::Enforce, Some(bundle)) => {
            let state = vm::state();
            let mut state = state.borrow_mut();
            state.entries_at = None;
            let policy = compile(bundle, &mut state)?;
            // The base of the next push's delta.
            state.retained = Retained::keep(&config);
            state.entries_at = Some(config.version.clone());
            if read == ConfigRead::Parsed {
                if let Some(index) = ConfigIndex::build(bytes, &config)
                    && host::shared_set(INDEX, &index.encode(), None).is_err()
                {
                    host::log(
                        LogLevel::Warn,
                        "could not publish the configuration's index; other VMs parse it again",
                    );
                }
                if let Some(retained) = &state.retained {
                    publish_state(retained);
                }
            }
            Some(policy)
        }
        _ => None,
    };
    let (active, sink) = Active::of(config, policy);
    Ok((active, sink, read))
}

/// Loads a delta: merges it with the entries this VM kept of its base, or with the
/// entries the previous canary published (this VM is the canary, or a VM that missed a
/// version). A VM whose prepared entries are its base's compiles the delta from what it
/// lists instead of merging (`CompiledPolicy::compile_raw_delta`). The VM keeps its
/// entries when the delta is refused.
fn load_delta(
    config: RawPluginConfig<'_>,
) -> Result<(Active, Option<AuditSink>, ConfigRead), String> {
    let base = config.base.clone().unwrap_or_default();
    let state = vm::state();
    let mut guard = state.borrow_mut();
    let mut read = ConfigRead::Delta;
    let prepared_at = guard.entries_at.take();
    let mut retained = match guard.retained.take() {
        Some(kept) if kept.serves(&base, &config.version) => kept,
        kept => {
            guard.retained = kept;
            let published = match host::shared_get(STATE) {
                Ok((Some(bytes), _)) => Retained::decode(bytes),
                _ => None,
            };
            match published {
                Some(published) if published.serves(&base, &config.version) => {
                    read = ConfigRead::DeltaShared;
                    published
                }
                published => {
                    return Err(format!(
                        "a delta against version {base}, which this VM does not hold (the last canary published {})",
                        published.as_ref().map_or("nothing", |p| p.version())
                    ));
                }
            }
        }
    };
    // A VM that decides no requests yet (Envoy's configuration canary, a fresh VM per
    // push) checks the delta against the published entries without preparing those it
    // leaves alone, and compiles the whole when it first decides ([`current`]).
    if read == ConfigRead::DeltaShared && accepted().is_none() {
        let validated = shared_validated();
        if let Some(checked) = CompiledPolicy::check_delta(&retained, &config, &validated) {
            retained.apply(retained.changes(&config)?);
            publish_state(&retained);
            if checked.validated_here != (0, 0, 0) {
                publish_validated(&checked.validated);
            }
            guard.retained = Some(retained);
            let timezones = config
                .bundle
                .as_ref()
                .and_then(|b| b.data.timezones.clone());
            let (mut active, sink) = Active::of(config, None);
            active.deferred = Some(Deferred {
                timezones,
                validated_here: checked.validated_here,
            });
            return Ok((active, sink, ConfigRead::DeltaChecked));
        }
    }
    let listed = read == ConfigRead::Delta
        && config.mode == Mode::Enforce
        && prepared_at.as_deref() == Some(retained.version());
    let listed = match listed {
        true => compile_listed(&retained, &config, &mut guard),
        false => None,
    };
    if listed.is_some() {
        read = ConfigRead::DeltaListed;
    }
    let outcome = match listed {
        Some(outcome) => outcome.map(|(policy, changes)| {
            let (active, sink) = Active::of(config, Some(policy));
            (active, sink, changes)
        }),
        None => retained.merge(config).and_then(|(merged, changes)| {
            let bundle = merged.bundle.as_ref().ok_or("a delta without a bundle")?;
            let policy = match merged.mode {
                Mode::Enforce => Some(compile(bundle, &mut guard)?),
                _ => None,
            };
            let (active, sink) = Active::of(merged, policy);
            Ok((active, sink, changes))
        }),
    };
    match outcome {
        Ok((active, sink, changes)) => {
            retained.apply(changes);
            if read == ConfigRead::DeltaShared {
                publish_state(&retained);
            }
            if active.policy.is_some() {
                guard.entries_at = Some(retained.version().to_owned());
            }
            guard.retained = Some(retained);
            Ok((active, sink, read))
        }
        Err(e) => {
            if read != ConfigRead::DeltaShared {
                guard.retained = Some(retained);
            }
            Err(e)
        }
    }
}

/// Compiles a delta from the entries it lists, on this VM's prepared entries of its base;
/// `None` when it has to be merged instead.
fn compile_listed(
    retained: &Retained,
    config: &RawPluginConfig<'_>,
    state: &mut vm::VmState,
) -> Option<Result<(CompiledPolicy, Changes), String>> {
    let changes = match retained.changes(config) {
        Ok(changes) => changes,
        Err(e) => return Some(Err(e)),
    };
    let bundle = config.bundle.as_ref()?;
    let policy = compile_by(state, |entries, validated| {
        CompiledPolicy::compile_raw_delta(bundle, entries, validated)
    });
    policy
        .transpose()
        .map(|policy| policy.map(|p| (p, changes)))
}

/// Prepares a bundle's entries against this VM's entries of the previous configuration
/// (a push only parses and prepares the agents and policies that changed; on_configure
/// runs between requests on the worker thread) and compiles its modules.
fn compile(bundle: &RawBundle<'_>, state: &mut vm::VmState) -> Result<CompiledPolicy, String> {
    compile_by(state, |entries, validated| {
        CompiledPolicy::compile_raw(bundle, entries, validated).map(Some)
    })?
    .ok_or_else(|| "the configuration was not compiled".to_owned())
}

/// Compiles with `how`, on this VM's prepared entries and the entries another VM of this
/// Envoy validated, and publishes what it validated itself.
fn compile_by(
    state: &mut vm::VmState,
    how: impl FnOnce(&mut EntryCache, &Validated) -> Result<Option<CompiledPolicy>, PolicyError>,
) -> Result<Option<CompiledPolicy>, String> {
    // Entries another VM validated are prepared on first use: the canary (a fresh VM per
    // push) validates what changed, the workers nothing.
    let validated = shared_validated();
    let policy = how(&mut state.entries, &validated).map_err(|e| e.to_string())?;
    if let Some(policy) = &policy
        && policy.validated_here() != (0, 0, 0)
    {
        publish_validated(&policy.validated());
    }
    Ok(policy)
}

/// The entries this Envoy's VMs validated (none when unreadable).
fn shared_validated() -> Validated {
    match host::shared_get(VALIDATED) {
        Ok((Some(bytes), _)) => Validated::decode(&bytes),
        _ => Validated::default(),
    }
}

/// Publishes the entries this Envoy's VMs validated (`Validated`'s shared form).
fn publish_validated(set: &[u8]) {
    if host::shared_set(VALIDATED, set, None).is_err() {
        host::log(
            LogLevel::Warn,
            "could not publish the validated entries; other VMs validate them again",
        );
    }
}

/// Publishes a configuration's entries as the base of the next canary's delta.
fn publish_state(retained: &Retained) {
    if host::shared_set(STATE, &retained.encode(), None).is_err() {
        host::log(
            LogLevel::Warn,
            "could not publish the configuration for the next canary; a delta against it will be refused and sent again in full",
        );
    }
}

/// Requests carry no root context (`abi`), so one VM serves one filter instance. A
/// configuration that can let requests through (enforce, allow-all) from another plugin
/// name than the VM's previous such configuration means two filters share this VM and
/// would decide each other's requests. The VM then denies every request for the rest of
/// its life (reason `not_configured`) and ignores every later configuration, with a
/// critical log telling the operator to give each ChronoGuard filter its own
/// `vm_config.vm_id`. The configuration is still *accepted*: Envoy 1.40 skips a filter
/// whose configuration a worker refused, letting its requests through unfiltered; an
/// accepted one keeps them coming into this VM, which denies them. Deny-all
/// configurations (the listener's default before the first bundle arrives) are accepted
/// from any name. Returns whether `mode`'s configuration may decide requests.
fn admit(mode: &Mode) -> bool {
    PLUGIN.with(|plugin| {
        let mut plugin = plugin.borrow_mut();
        if matches!(*plugin, Serving::Conflict) {
            return false;
        }
        if *mode == Mode::DenyAll {
            return true;
        }
        let name = host::property(&["plugin_name"]).unwrap_or_default();
        match &*plugin {
            Serving::Conflict => false,
            Serving::Nobody => {
                *plugin = Serving::Plugin(name);
                true
            }
            Serving::Plugin(first) if *first == name => true,
            Serving::Plugin(first) => {
                host::log(
                    LogLevel::Critical,
                    &format!(
                        "this VM already serves the filter `{first}`, not `{name}`: every request on it is denied until each ChronoGuard filter has its own vm_config.vm_id"
                    ),
                );
                *plugin = Serving::Conflict;
                CURRENT.with(|c| *c.borrow_mut() = None);
                false
            }
        }
    })
}

/// Which filter instance (plugin name) this VM serves.
enum Serving {
    Nobody,
    Plugin(String),
    /// Two filters sent it configurations that let requests through.
    Conflict,
}

/// A root context's `on_configure`: loads the configuration and makes it the one that
/// decides requests. `false` refuses one that cannot be loaded; that happens first in
/// Envoy's configuration canary (a fresh VM on the main thread), which makes Envoy NACK
/// it and keep the previous one before any worker sees it. A VM that already decides
/// requests never refuses: it keeps its configuration, logs at critical level and counts
/// `config_rejected` (a refusal on a worker alone would make Envoy 1.40 skip the filter:
/// see [`admit`]).
pub fn configure(root_context_id: u32) -> bool {
    let bytes = host::configuration().unwrap_or_default();
    let started = host::now_ns();
    let state = vm::state();
    match load(&bytes) {
        Ok((mut active, sink, read)) => {
            let elapsed_ms = host::now_ns().saturating_sub(started) as f64 / 1e6;
            let (agents, policies, modules) = active.validated_here();
            let through = read.log_prefix();
            host::log(
                LogLevel::Info,
                &format!(
                    "root {root_context_id}: configuration {} loaded ({:?}, {} bytes, {through}{agents} agents, {policies} policies and {modules} module sets validated here, {elapsed_ms:.3} ms)",
                    active.version,
                    active.mode,
                    bytes.len()
                ),
            );
            let mut state = state.borrow_mut();
            // The tick flushes stats and decides ahead the memoised decisions that expire
            // soon, every `WARM_TICK_MS` at most; it sends audit batches every flush
            // interval (`VmState::tick`).
            let flush = sink.as_ref().map_or(1_000, |a| a.flush_interval_ms);
            let period = flush.clamp(1, WARM_TICK_MS);
            TICK_NS.set(period * 1_000_000);
            tick_only(root_context_id, Duration::from_millis(period));
            if admit(&active.mode) {
                if let Ok(version) = active.version.parse::<u64>() {
                    host::record(state.metrics.config_version, version);
                }
                if sink.is_some() {
                    state.set_sink(sink);
                }
                // Decisions about agents the push left alone stay memoised.
                let previous = accepted();
                if let (Some(policy), Some(previous)) = (active.policy.as_mut(), previous)
                    && let Ok(mut previous) = previous.try_borrow_mut()
                    && let Some(old) = previous.policy.as_mut()
                {
                    policy.inherit_memo(old);
                }
                CURRENT.with(|c| *c.borrow_mut() = Some(Rc::new(RefCell::new(active))));
                crate::ratelimit::reset();
            }
            true
        }
        Err(err) => {
            host::increment(state.borrow().metrics.config_rejected, 1);
            // A VM that already decides requests keeps its configuration and says it
            // accepted the new one: a refusal on a worker alone would make Envoy 1.40 skip
            // the filter there (fail open). Only a VM that has never accepted one refuses:
            // Envoy's configuration canary is such a fresh VM, and its refusal is what
            // makes Envoy NACK a bad configuration before any worker sees it.
            if let Some(kept) = accepted() {
                let kept = kept.try_borrow().map(|a| a.version.clone()).ok();
                host::log(
                    LogLevel::Critical,
                    &format!(
                        "root {root_context_id}: configuration refused: {err}; this VM keeps deciding under configuration {}",
                        kept.as_deref().unwrap_or("?")
                    ),
                );
                return true;
            }
            host::log(
                LogLevel::Critical,
                &format!("root {root_context_id}: configuration refused: {err}"),
            );
            false
        }
    }
}

/// The response to an audit callout (any root context's).
pub fn callout_response(token: u32) {
    let state = vm::state();
    let mut state = state.borrow_mut();
    if state.owns(token) {
        state.completed(host::callout_status());
    }
}

/// The root context the SDK creates if Envoy calls its own entry points: only a module
/// not processed by `cargo xtask build-filter` (which renames `abi`'s into place) does.
pub struct Unprocessed;

impl Context for Unprocessed {}

impl RootContext for Unprocessed {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        host::log(
            LogLevel::Critical,
            "this module was not processed by `cargo xtask build-filter`: load target/filter/chronoguard.wasm",
        );
        false
    }
}
