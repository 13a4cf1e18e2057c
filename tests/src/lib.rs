//! The ChronoGuard end-to-end harness: real PostgreSQL, Redis, control plane, Envoy with
//! the built filter, and an upstream, each on a free loopback port.
//!
//! [`Stack::start`] brings everything up in parallel, waits on readiness (never on fixed
//! sleeps) and stops every process when dropped; a watchdog per child also kills it if the
//! test process dies without running destructors. PostgreSQL and Redis are shared per test
//! process; each stack gets a fresh database.

pub mod api_stack;
pub mod certs;
pub mod chain;
pub mod client;
pub mod control_plane;
pub mod envoy;
pub mod jwt;
pub mod pglite;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod stack;
pub mod upstream;

pub use stack::{Stack, StackOptions};

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The cargo target directory (respects `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A free TCP port on 127.0.0.1 (the OS picks; released before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
