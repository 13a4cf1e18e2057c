//! The control plane binary, run as a child process against the harness's databases.

use crate::process::Process;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the control plane's log says when a port it was given was taken in the meantime.
const BIND_RACE: &str = "Address already in use";

pub struct ControlPlane {
    pub http_port: u16,
    pub grpc_port: u16,
    pub admin_token: String,
    pub ingest_token: String,
    /// The audit signing settings it runs with (generated per run, never in the repo).
    pub audit_keys: AuditKeys,
    process: Process,
    config: ControlPlaneConfig,
}

/// What a control plane needs to start (kept so it can be restarted identically).
#[derive(Clone)]
pub struct ControlPlaneConfig {
    pub database_url: String,
    pub redis_url: String,
    pub wasm: PathBuf,
    pub log: PathBuf,
    pub audit_flush_interval_ms: u64,
}

/// Audit signing settings for a control plane: fresh random keys per run. Replicas of one
/// database share them (clone them into [`ControlPlane::start_with_keys`]).
#[derive(Clone, Debug)]
pub struct AuditKeys {
    /// `key_id:hex_secret[,…]`.
    pub hmac_keys: String,
    pub hmac_active_key: String,
    /// Ed25519 seed, 64 hex digits.
    pub checkpoint_seed: String,
    pub checkpoint_key_id: String,
    /// Periodic checkpoints; 0 (the default here) leaves them to explicit requests.
    pub checkpoint_interval_secs: u64,
    /// Audit retention (`audit.retention_days`); 0 (the default here) keeps everything, so
    /// suites with fixed old timestamps are not pruned when a control plane restarts.
    pub retention_days: u32,
    /// `audit.maintenance_interval_secs`; 0 (the default here): at start-up only.
    pub maintenance_interval_secs: u64,
}

impl AuditKeys {
    pub fn generate() -> Self {
        let id = |prefix: &str| {
            format!(
                "{prefix}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        };
        let hmac_id = id("hmac");
        Self {
            hmac_keys: format!("{hmac_id}:{}", random_hex32()),
            hmac_active_key: hmac_id,
            checkpoint_seed: random_hex32(),
            checkpoint_key_id: id("cp"),
            checkpoint_interval_secs: 0,
            retention_days: 0,
            maintenance_interval_secs: 0,
        }
    }
}

/// 32 random bytes as hex (two v4 UUIDs: 244 random bits, plenty for test keys).
fn random_hex32() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The binary: `CHRONOGUARD_CONTROL_PLANE`, or the workspace's debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("CHRONOGUARD_CONTROL_PLANE")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("debug/chronoguard-control-plane"))
}

// === impl ControlPlane ===

impl ControlPlane {
    pub async fn start(config: ControlPlaneConfig) -> anyhow::Result<Self> {
        Self::start_with_keys(config, AuditKeys::generate()).await
    }

    /// Starts with given audit keys (a second replica of the same database).
    pub async fn start_with_keys(
        config: ControlPlaneConfig,
        audit_keys: AuditKeys,
    ) -> anyhow::Result<Self> {
        // Ports come from `free_port`, which another test may take before the control
        // plane binds them: on `Address already in use` it starts again on other ports
        // (three attempts), as Envoy does (`crate::envoy`).
        let mut attempt = 1;
        loop {
            let (http_port, grpc_port) = (crate::free_port(), crate::free_port());
            let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
            let ingest_token = format!("ingest-{}", uuid::Uuid::new_v4().simple());
            let process = spawn(
                &config,
                http_port,
                grpc_port,
                &admin_token,
                &ingest_token,
                &audit_keys,
            )?;
            let mut cp = Self {
                http_port,
                grpc_port,
                admin_token,
                ingest_token,
                audit_keys: audit_keys.clone(),
                process,
                config: config.clone(),
            };
            match cp.wait_ready().await {
                Ok(()) => return Ok(cp),
                Err(err) => {
                    let log = std::fs::read_to_string(&cp.config.log).unwrap_or_default();
                    if attempt < 3 && log.contains(BIND_RACE) {
                        cp.stop();
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The HS256 secret this control plane verifies admin JWTs with (see [`crate::jwt`]).
    pub fn jwt_secret(&self) -> String {
        jwt_secret_for(&self.admin_token)
    }

    /// Waits until it reports ready; fails at once if the process exits first (a port
    /// taken, a bad setting), else after 30 s.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = crate::client::plain_client()?;
        let url = self.url("/health/ready");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ready = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            let why = if !self.process.running() {
                "the control plane exited before it was ready"
            } else if std::time::Instant::now() > deadline {
                "timed out after 30s waiting for control plane ready"
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            anyhow::bail!("{why}; see {}", self.config.log.display());
        }
    }

    /// The process id (for CPU and memory figures).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// POSTs an audit batch to the ingest endpoint with the filter's credential.
    pub async fn post_audit_batch(
        &self,
        http: &reqwest::Client,
        batch: &serde_json::Value,
    ) -> reqwest::Result<reqwest::Response> {
        http.post(self.url("/api/v1/audit/batches"))
            .bearer_auth(&self.ingest_token)
            .json(batch)
            .send()
            .await
    }

    /// Stops the process (SIGTERM).
    pub fn stop(&mut self) {
        self.process.stop(std::time::Duration::from_secs(5));
    }

    /// Starts it again on the same ports and tokens.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.process = spawn(
            &self.config,
            self.http_port,
            self.grpc_port,
            &self.admin_token,
            &self.ingest_token,
            &self.audit_keys,
        )?;
        self.wait_ready().await
    }
}

fn spawn(
    config: &ControlPlaneConfig,
    http_port: u16,
    grpc_port: u16,
    admin_token: &str,
    ingest_token: &str,
    audit_keys: &AuditKeys,
) -> anyhow::Result<Process> {
    let binary = binary();
    anyhow::ensure!(
        binary.exists(),
        "{} not found: build it with `cargo build -p control-plane`",
        binary.display()
    );
    let mut cmd = Command::new(&binary);
    cmd.env("APP__HTTP__ADDR", format!("127.0.0.1:{http_port}"))
        .env("APP__GRPC__ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("APP__DATABASE__URL", &config.database_url)
        .env("APP__REDIS__URL", &config.redis_url)
        .env("APP__AUTH__ADMIN_TOKEN", admin_token)
        .env("APP__AUTH__INGEST_TOKEN", ingest_token)
        .env("APP__AUTH__JWT__SECRET", jwt_secret_for(admin_token))
        .env("APP__GATEWAY__WASM_FILENAME", path_str(&config.wasm))
        .env(
            "APP__GATEWAY__AUDIT_FLUSH_INTERVAL_MS",
            config.audit_flush_interval_ms.to_string(),
        )
        .env("APP__TESTING__HOOKS", "true")
        .env("APP__LOG__FORMAT", "json")
        .env("APP__LOG__LEVEL", "info")
        .env("APP__AUDIT__HMAC_KEYS", &audit_keys.hmac_keys)
        .env("APP__AUDIT__HMAC_ACTIVE_KEY", &audit_keys.hmac_active_key)
        .env(
            "APP__AUDIT__CHECKPOINT_SIGNING_KEY",
            &audit_keys.checkpoint_seed,
        )
        .env(
            "APP__AUDIT__CHECKPOINT_KEY_ID",
            &audit_keys.checkpoint_key_id,
        )
        .env(
            "APP__AUDIT__CHECKPOINT_INTERVAL_SECS",
            audit_keys.checkpoint_interval_secs.to_string(),
        )
        .env(
            "APP__AUDIT__RETENTION_DAYS",
            audit_keys.retention_days.to_string(),
        )
        .env(
            "APP__AUDIT__MAINTENANCE_INTERVAL_SECS",
            audit_keys.maintenance_interval_secs.to_string(),
        );
    Process::spawn("control-plane", cmd, &config.log)
}

/// Derived from the run's random admin token, so it is as fresh and never in the repo.
fn jwt_secret_for(admin_token: &str) -> String {
    use sha2::Digest as _;
    format!(
        "jwt-{}",
        hex::encode(sha2::Sha256::digest(format!("jwt:{admin_token}")))
    )
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
