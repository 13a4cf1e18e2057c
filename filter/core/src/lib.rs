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

/// A test's reproducible random numbers (xorshift): each call returns one below `n`.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// The Rego modules of the `rego/` library, embedded so the control plane ships exactly the
/// library this core was tested against.
pub const REGO_LIBRARY: &[(&str, &str)] = &[(
    "chronoguard.rego",
    include_str!("../../../rego/policies/chronoguard.rego"),
)];

/// The rule the filter evaluates.
pub const DECISION_RULE: &str = "data.chronoguard.decision";
