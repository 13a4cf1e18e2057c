//! A Redis server per test process.

use crate::process::Process;
use std::process::Command;
use std::sync::Arc;
use tokio::sync::OnceCell;

pub struct Redis {
    pub port: u16,
    _process: Process,
}

static SHARED: OnceCell<Arc<Redis>> = OnceCell::const_new();

// === impl Redis ===

impl Redis {
    pub async fn shared() -> anyhow::Result<Arc<Redis>> {
        SHARED
            .get_or_try_init(|| async { Redis::start().await.map(Arc::new) })
            .await
            .cloned()
    }

    pub async fn start() -> anyhow::Result<Self> {
        let dir = crate::postgres::tempdir("chronoguard-redis")?;
        let port = crate::free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir);
        let process =
            Process::spawn_with_cleanup("redis", cmd, &dir.join("redis.log"), Some(&dir))?;
        crate::wait_for("redis", std::time::Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        Ok(Self {
            port,
            _process: process,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
