//! The ECDS server: streams the filter configuration to Envoy and tracks ACK/NACK per node.

pub mod ecds;
pub mod proto;

pub use ecds::{EcdsServer, EnvoyRegistry, EnvoyStatus};
