//! Typed settings: one YAML file plus `APP__SECTION__KEY` environment overrides.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub http: Listen,
    pub grpc: Listen,
    pub database: Database,
    pub redis: Redis,
    pub auth: Auth,
    pub gateway: Gateway,
    pub log: Log,
    /// Test hooks (`POST /api/v1/testing/...`); never enable in production.
    #[serde(default)]
    pub testing: Testing,
    /// Audit signing keys and checkpoints; unsigned and without checkpoints when absent.
    #[serde(default)]
    pub audit: Audit,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Listen {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Database {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Redis {
    pub url: Secret,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Auth {
    /// Bearer token of the platform administrator.
    pub admin_token: Secret,
    /// Bearer token the filter presents to the audit ingest endpoint.
    pub ingest_token: Secret,
    /// Tenant-scoped bearer JWTs for the admin API; disabled while no key is set.
    #[serde(default)]
    pub jwt: Jwt,
    /// Per-credential admin API rate limit (a token bucket in Redis).
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// A token bucket per admin credential, kept in Redis so replicas share it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RateLimit {
    pub enabled: bool,
    /// Sustained rate.
    pub requests_per_minute: u32,
    /// Bucket size: requests allowed at once after a quiet period.
    pub burst: u32,
    /// Without Redis: `true` lets requests through (fail open), `false` answers 503.
    pub fail_open: bool,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_minute: 1_200,
            burst: 600,
            fail_open: true,
        }
    }
}

/// How admin API JWTs are verified. HS256 with a shared secret for development; RS256 or
/// ES256 with the issuer's public key (PEM) in production.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Jwt {
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (at least 32 bytes); set it through `APP__AUTH__JWT__SECRET`.
    pub secret: Secret,
    /// RS256/ES256 verification key, PEM (SubjectPublicKeyInfo).
    pub public_key_pem: String,
    /// Required `iss` claim when not empty.
    pub issuer: String,
    /// Required `aud` claim when not empty.
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub leeway_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
}

impl Default for Jwt {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::Hs256,
            secret: Secret::default(),
            public_key_pem: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
        }
    }
}

/// What the control plane tells Envoy gateways in the ECDS resource.
#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    pub resource_name: String,
    pub wasm_filename: String,
    pub vm_id: String,
    pub audit_cluster: String,
    pub audit_authority: String,
    pub audit_batch_size: usize,
    pub audit_flush_interval_ms: u64,
    pub audit_max_buffered: usize,
    /// Least time between two pushes to one Envoy (`xds::ecds`); 0 pushes every change.
    /// At most [`MAX_PUSH_INTERVAL_MS`].
    #[serde(default = "default_push_min_interval_ms")]
    pub push_min_interval_ms: u64,
    /// Send a push as the changes since the version last sent on the stream when that is
    /// under half the bundle's size (`filter_core::delta`); false: always in full.
    #[serde(default = "default_push_deltas")]
    pub push_deltas: bool,
}

fn default_push_deltas() -> bool {
    true
}

/// The default of `gateway.push_min_interval_ms`.
fn default_push_min_interval_ms() -> u64 {
    1_000
}

/// The longest `gateway.push_min_interval_ms`: a change waits at most this long for the
/// next push.
pub const MAX_PUSH_INTERVAL_MS: u64 = 60_000;

/// Audit chain signing. Secrets come from the environment (`APP__AUDIT__HMAC_KEYS`,
/// `APP__AUDIT__CHECKPOINT_SIGNING_KEY`), never from a file in the repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Audit {
    /// HMAC-SHA256 entry keys, `key_id:hex_secret[,key_id:hex_secret…]` (secrets of at
    /// least 32 bytes). Verification accepts every key listed, so keep rotated-out keys.
    pub hmac_keys: Secret,
    /// The key id new entries are signed with; required when keys are set.
    pub hmac_active_key: String,
    /// Ed25519 checkpoint signing key: a 32-byte seed as 64 hex digits. Empty disables
    /// checkpoints.
    pub checkpoint_signing_key: Secret,
    /// Key id published with the checkpoint public key.
    pub checkpoint_key_id: String,
    /// Earlier checkpoint public keys still trusted, `key_id:hex_public_key[,…]`.
    pub checkpoint_trusted_keys: String,
    /// How often every chain head that moved is checkpointed; 0 disables the task.
    pub checkpoint_interval_secs: u64,
    /// Entries are dropped by weekly partition/chunk once the range ended this many days
    /// ago, after each chain is anchored on a signed checkpoint; 0 keeps everything.
    pub retention_days: u32,
    /// How often storage maintenance (partitions ahead, retention) runs after the run at
    /// start-up; 0 runs it at start-up only.
    pub maintenance_interval_secs: u64,
    /// Weekly partitions kept ready after the current week (native partitioning only;
    /// TimescaleDB creates chunks on demand).
    pub partitions_ahead: u32,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            hmac_keys: Secret::default(),
            hmac_active_key: String::new(),
            checkpoint_signing_key: Secret::default(),
            checkpoint_key_id: String::new(),
            checkpoint_trusted_keys: String::new(),
            checkpoint_interval_secs: 300,
            retention_days: 365,
            maintenance_interval_secs: 3600,
            partitions_ahead: 4,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Testing {
    #[serde(default)]
    pub hooks: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

// === impl Secret ===

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    #[error("setting {0} must be set (use the environment, e.g. APP__AUTH__ADMIN_TOKEN)")]
    Missing(&'static str),
    #[error("setting {setting} is invalid: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

// === impl Settings ===

impl Settings {
    /// Loads `path` (or `control-plane/config/base.yaml` when it exists), then the
    /// environment, and checks what must be set.
    pub fn load(path: Option<&str>) -> Result<Self, SettingsError> {
        let default = concat!(env!("CARGO_MANIFEST_DIR"), "/config/base.yaml");
        let mut builder = config::Config::builder();
        builder = match path {
            Some(path) => builder.add_source(config::File::with_name(path)),
            None => builder.add_source(config::File::with_name(default).required(false)),
        };
        let settings: Self = builder
            .add_source(
                config::Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.check()?;
        Ok(settings)
    }

    pub fn check(&self) -> Result<(), SettingsError> {
        if self.auth.admin_token.is_empty() {
            return Err(SettingsError::Missing("auth.admin_token"));
        }
        if self.auth.ingest_token.is_empty() {
            return Err(SettingsError::Missing("auth.ingest_token"));
        }
        if self.database.url.is_empty() {
            return Err(SettingsError::Missing("database.url"));
        }
        if self.audit.partitions_ahead > 520 {
            return Err(SettingsError::Invalid {
                setting: "audit.partitions_ahead",
                problem: "at most 520 weeks".into(),
            });
        }
        if self.gateway.push_min_interval_ms > MAX_PUSH_INTERVAL_MS {
            return Err(SettingsError::Invalid {
                setting: "gateway.push_min_interval_ms",
                problem: format!("at most {MAX_PUSH_INTERVAL_MS} ms (0 pushes every change)"),
            });
        }
        if self.audit.retention_days > 36_500 {
            return Err(SettingsError::Invalid {
                setting: "audit.retention_days",
                problem: "at most 36500 days (0 keeps everything)".into(),
            });
        }
        crate::api::auth::JwtVerifier::from_settings(&self.auth.jwt).map_err(|problem| {
            SettingsError::Invalid {
                setting: "auth.jwt",
                problem,
            }
        })?;
        Ok(())
    }
}
