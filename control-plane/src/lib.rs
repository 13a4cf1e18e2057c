//! ChronoGuard control plane: admin REST API, ECDS server, policy bundle compiler, audit
//! ingest with its hash chain.

pub mod api;
pub mod app;
pub mod audit;
pub mod bundle;
pub mod config;
pub mod domain;
pub mod policy_spec;
pub mod storage;
pub mod telemetry;
pub mod xds;
