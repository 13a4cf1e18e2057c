//! ChronoGuard's decision core, shared by the Envoy filter and the control plane.
//!
//! Everything here is host-agnostic: it compiles natively for unit tests and for the control
//! plane's validation and dry runs, and for `wasm32-wasip1` inside the proxy-wasm glue. The
//! glue only gathers request facts, calls [`policy::CompiledPolicy::evaluate`] and acts on
//! the [`decision::Decision`].

pub mod audit;
pub mod config;
pub mod data;
pub mod decision;
pub mod delta;
pub mod input;
pub mod policy;
pub mod ratelimit;
pub mod time;

#[cfg(test)]
mod cases;

/// The Rego modules of the `rego/` library, embedded so the control plane ships exactly the
/// library this core was tested against.
pub const REGO_LIBRARY: &[(&str, &str)] = &[(
    "chronoguard.rego",
    include_str!("../../../rego/policies/chronoguard.rego"),
)];

/// The rule the filter evaluates.
pub const DECISION_RULE: &str = "data.chronoguard.decision";
