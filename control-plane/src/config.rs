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
        Ok(())
    }
}
