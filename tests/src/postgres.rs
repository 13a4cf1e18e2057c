//! A throwaway PostgreSQL cluster per test process, a fresh database per stack.
//!
//! PostgreSQL refuses to run as root: as root, the data directory (a fresh temp dir,
//! outside the checkout so the `postgres` user can traverse it) belongs to `postgres` and
//! the server runs through `setpriv`, which execs (so the pid we hold is the server's).

use crate::process::Process;
use anyhow::Context as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use tokio::sync::OnceCell;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub port: u16,
    pub dir: PathBuf,
    _process: Process,
}

static SHARED: OnceCell<Arc<Postgres>> = OnceCell::const_new();

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        cmd.arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

// === impl Postgres ===

impl Postgres {
    /// The process-wide cluster, started on first use.
    pub async fn shared() -> anyhow::Result<Arc<Postgres>> {
        SHARED
            .get_or_try_init(|| async { Postgres::start().await.map(Arc::new) })
            .await
            .cloned()
    }

    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempdir("chronoguard-pg")?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?;
            anyhow::ensure!(status.success(), "chown of the postgres dir failed");
        }
        let data = dir.join("data");
        let status = as_postgres(&format!("{BIN}/initdb"))
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running initdb (is postgresql-15 installed? run `cargo xtask setup`)")?;
        anyhow::ensure!(status.success(), "initdb failed");
        let port = crate::free_port();
        let mut cmd = as_postgres(&format!("{BIN}/postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ]);
        let process =
            Process::spawn_with_cleanup("postgres", cmd, &dir.join("postgres.log"), Some(&dir))?;
        let pg = Self {
            port,
            dir,
            _process: process,
        };
        crate::wait_for("postgres", std::time::Duration::from_secs(30), || async {
            sqlx::PgPool::connect(&pg.url("postgres"))
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        Ok(pg)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        let name = format!("cg_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&self.url("postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(self.url(&name))
    }
}

/// A fresh directory under the system temp dir, readable by other users.
pub fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
