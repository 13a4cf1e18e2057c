//! The policy bundle compiler and publisher.
//!
//! From the database's agents and active policies it builds the data document the Rego
//! library evaluates (agents indexed by certificate fingerprint, policies by id), validates
//! the bundle with the filter's own core, gives it a persisted monotonic version and
//! publishes it to the ECDS streams. Identical inputs give byte-identical bundles.

use crate::config::{Gateway, Secret};
use crate::storage::{self, StoreError};
use filter_core::config::{AuditSink, Bundle, Mode, PluginConfig, RegoModule};
use filter_core::policy::{CompiledPolicy, PolicyError};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{Mutex, watch};

/// A published bundle, ready to be sent to Envoy.
#[derive(Debug)]
pub struct Snapshot {
    pub version: i64,
    pub content_hash: String,
    /// The filter's plugin configuration JSON (contains the ingest credential: never log).
    pub plugin_config: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bundle does not validate: {0}")]
    Invalid(#[from] PolicyError),
}

pub struct Publisher {
    pool: PgPool,
    gateway: Gateway,
    ingest_token: Secret,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    lock: Mutex<()>,
    /// Background rebuilds that failed (the alert metric).
    pub failures: std::sync::atomic::AtomicU64,
    /// Bundles published since start.
    pub publishes: std::sync::atomic::AtomicU64,
}

// === impl Publisher ===

impl Publisher {
    pub fn new(pool: PgPool, gateway: Gateway, ingest_token: Secret) -> Self {
        let (tx, _) = watch::channel(None);
        Self {
            pool,
            gateway,
            ingest_token,
            tx,
            lock: Mutex::new(()),
            failures: std::sync::atomic::AtomicU64::new(0),
            publishes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.tx.borrow().clone()
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Rebuilds from the database and publishes when the content changed. Serialised, so
    /// concurrent writes cannot publish out of order.
    pub async fn rebuild(&self) -> Result<Arc<Snapshot>, BundleError> {
        let _guard = self.lock.lock().await;
        let bundle = compile(&self.pool).await?;
        let started = std::time::Instant::now();
        CompiledPolicy::compile(&bundle)?;
        let bundle_json =
            serde_json::to_vec(&bundle).map_err(|e| PolicyError::Data(e.to_string()))?;
        let content_hash = hex::encode(Sha256::digest(&bundle_json));
        if let Some(current) = self.current()
            && current.content_hash == content_hash
        {
            return Ok(current);
        }
        let version = storage::bundle::version_for(&self.pool, &content_hash).await?;
        let config = PluginConfig {
            version: version.to_string(),
            mode: Mode::Enforce,
            bundle: Some(bundle),
            audit: Some(AuditSink {
                cluster: self.gateway.audit_cluster.clone(),
                authority: self.gateway.audit_authority.clone(),
                path: "/api/v1/audit/batches".into(),
                token: self.ingest_token.expose().to_owned(),
                batch_size: self.gateway.audit_batch_size,
                flush_interval_ms: self.gateway.audit_flush_interval_ms,
                max_buffered: self.gateway.audit_max_buffered,
                timeout_ms: 2_000,
            }),
        };
        let plugin_config =
            serde_json::to_string(&config).map_err(|e| PolicyError::Data(e.to_string()))?;
        let snapshot = Arc::new(Snapshot {
            version,
            content_hash,
            plugin_config,
        });
        tracing::info!(
            version,
            bytes = snapshot.plugin_config.len(),
            validate_ms = started.elapsed().as_millis() as u64,
            "policy bundle published"
        );
        self.tx.send_replace(Some(snapshot.clone()));
        self.publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(snapshot)
    }
}

/// How often the bundle is rebuilt without a write: rolls the timezone offset tables
/// forward and picks up changes made by other replicas.
pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Rebuilds every [`REFRESH_INTERVAL`]. A rebuild that fails keeps the last good bundle
/// published and is logged (and counted) as an alert.
pub async fn refresh_periodically(publisher: Arc<Publisher>) {
    let mut interval = tokio::time::interval(REFRESH_INTERVAL);
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(err) = publisher.rebuild().await {
            publisher
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %err, "background bundle rebuild failed; keeping the last good bundle");
        }
    }
}

/// Offset tables cover this many days from the start of their 30-day bucket, so a bundle
/// is byte-identical for 30 days and always covers at least the next 400 days.
const TABLE_DAYS: i64 = 430;
const BUCKET_S: i64 = 30 * 86_400;

// === impl Publisher (test hook) ===

impl Publisher {
    /// Publishes `plugin_config` without validating it, under a new version. Only the
    /// testing hook calls this (to exercise Envoy's NACK path).
    pub async fn publish_unvalidated(
        &self,
        plugin_config: String,
    ) -> Result<Arc<Snapshot>, BundleError> {
        let _guard = self.lock.lock().await;
        let content_hash = hex::encode(Sha256::digest(plugin_config.as_bytes()));
        let version = storage::bundle::version_for(&self.pool, &content_hash).await?;
        let snapshot = Arc::new(Snapshot {
            version,
            content_hash,
            plugin_config,
        });
        tracing::warn!(
            version,
            "unvalidated bundle published through the testing hook"
        );
        self.tx.send_replace(Some(snapshot.clone()));
        self.publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(snapshot)
    }
}

/// Builds the bundle (library modules, custom modules, indexed data with timezone offset
/// tables) from the database.
pub async fn compile(pool: &PgPool) -> Result<Bundle, BundleError> {
    let agents = storage::bundle::agents(pool).await?;
    let policies = storage::bundle::active_policies(pool).await?;
    compile_rows(agents, policies, chrono::Utc::now().timestamp())
}

/// The pure part of [`compile`]: rows in, bundle out.
pub fn compile_rows(
    agents: Vec<storage::bundle::AgentRow>,
    policies: Vec<storage::bundle::PolicyRow>,
    now_s: i64,
) -> Result<Bundle, BundleError> {
    let invalid = |message: String| BundleError::Invalid(PolicyError::Data(message));
    let mut agent_index = Map::new();
    for a in agents {
        agent_index.insert(
            a.fingerprint,
            json!({
                "id": a.id,
                "tenant_id": a.tenant_id,
                "name": a.name,
                "status": a.status,
                "metadata": a.metadata,
                "policies": a.policies,
            }),
        );
    }
    let mut modules = CompiledPolicy::library_modules();
    let mut timezones = std::collections::BTreeSet::new();
    let mut policy_index = Map::new();
    for p in policies {
        let (timezone, windows) = match &p.time_restrictions {
            None | Some(Value::Null) => ("UTC".to_owned(), Vec::new()),
            Some(t) => {
                time_restrictions(t).map_err(|e| invalid(format!("policy {}: {e}", p.id)))?
            }
        };
        if timezone != "UTC" {
            timezones.insert(timezone.clone());
        }
        let custom = match &p.custom_rego {
            Some(source) if !source.trim().is_empty() => {
                let key = format!("p{}", p.id.simple());
                modules.push(RegoModule {
                    name: format!("custom/{key}.rego"),
                    source: with_package(source, &key),
                });
                Value::String(key)
            }
            _ => Value::Null,
        };
        policy_index.insert(
            p.id.to_string(),
            json!({
                "id": p.id,
                "tenant_id": p.tenant_id,
                "name": p.name,
                "priority": p.priority,
                "status": p.status,
                "mode": p.mode,
                "timezone": timezone,
                "windows": windows,
                "rules": p.rules,
                "rate_limit": p.rate_limit.unwrap_or(Value::Null),
                "custom": custom,
                "allowed_domains": p.allowed_domains,
                "blocked_domains": p.blocked_domains,
            }),
        );
    }
    let from = now_s.div_euclid(BUCKET_S) * BUCKET_S - 86_400;
    let to = from + TABLE_DAYS * 86_400;
    let mut tables = Map::new();
    for tz in timezones {
        let table = filter_core::time::offset_table(&tz, from, to).map_err(invalid)?;
        tables.insert(tz, json!(table));
    }
    let mut data = Map::new();
    data.insert("agents".into(), Value::Object(agent_index));
    data.insert("policies".into(), Value::Object(policy_index));
    data.insert("timezones".into(), Value::Object(tables));
    Ok(Bundle {
        modules,
        data: Value::Object(data),
    })
}

/// `{"timezone": "America/New_York", "windows": [{"days": ["mon"], "start": "09:00",
/// "end": "17:00"}]}` → the timezone and windows in minutes of the day.
fn time_restrictions(value: &Value) -> Result<(String, Vec<Value>), String> {
    let timezone = value
        .get("timezone")
        .and_then(Value::as_str)
        .unwrap_or("UTC")
        .to_owned();
    let windows = match value.get("windows") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(windows)) => windows
            .iter()
            .map(|w| {
                let minute = |key: &str| -> Result<u32, String> {
                    let text = w.get(key).and_then(Value::as_str).unwrap_or_default();
                    parse_hhmm(text).ok_or_else(|| format!("window {key} {text:?} is not HH:MM"))
                };
                Ok(json!({
                    "days": w.get("days").cloned().unwrap_or(Value::Null),
                    "start": minute("start")?,
                    "end": minute("end")?,
                }))
            })
            .collect::<Result<_, String>>()?,
        Some(_) => return Err("time_restrictions.windows must be an array".into()),
    };
    Ok((timezone, windows))
}

/// `HH:MM` (00:00..=24:00) → minutes of the day.
pub fn parse_hhmm(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    let minutes = h * 60 + m;
    (h <= 24 && m < 60 && minutes <= 1440 && h.to_string().len() <= 2 && m.to_string().len() <= 2)
        .then_some(minutes)
}

/// Replaces the module's first `package` line with the policy's own package, so custom
/// Rego can only add to `chronoguard.custom.<key>` (line numbers stay the same).
pub fn with_package(source: &str, key: &str) -> String {
    let package = format!("package chronoguard.custom.{key}");
    let mut replaced = false;
    let lines: Vec<String> = source
        .lines()
        .map(|line| {
            if !replaced && line.trim_start().starts_with("package ") {
                replaced = true;
                package.clone()
            } else {
                line.to_owned()
            }
        })
        .collect();
    if replaced {
        lines.join("\n")
    } else {
        format!("{package}\n{source}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhmm() {
        assert_eq!(parse_hhmm("09:30"), Some(570));
        assert_eq!(parse_hhmm("24:00"), Some(1440));
        for bad in ["9", "24:01", "12:60", "aa:bb", "", "-1:00"] {
            assert_eq!(parse_hhmm(bad), None, "{bad}");
        }
    }

    #[test]
    fn custom_package_is_forced() {
        let out = with_package(
            "package mine\nimport rego.v1\ndeny contains \"x\" if true",
            "pabc",
        );
        assert!(out.starts_with("package chronoguard.custom.pabc\nimport rego.v1"));
        assert!(
            with_package("deny contains 1 if true", "k")
                .starts_with("package chronoguard.custom.k\n")
        );
    }

    #[test]
    fn identical_rows_give_identical_bundles_within_a_bucket() {
        let policy = || storage::bundle::PolicyRow {
            id: uuid::Uuid::from_u128(7),
            tenant_id: uuid::Uuid::from_u128(1),
            name: "p".into(),
            priority: 1,
            status: "active".into(),
            mode: "enforce".into(),
            allowed_domains: vec!["a.example".into()],
            blocked_domains: vec![],
            rules: json!([]),
            time_restrictions: Some(
                json!({"timezone": "Europe/Paris", "windows": [{"days": ["mon"], "start": "09:00", "end": "17:00"}]}),
            ),
            rate_limit: None,
            custom_rego: None,
        };
        let now = 1_764_000_000;
        let a = serde_json::to_vec(&compile_rows(vec![], vec![policy()], now).unwrap()).unwrap();
        let b =
            serde_json::to_vec(&compile_rows(vec![], vec![policy()], now + 60).unwrap()).unwrap();
        assert_eq!(a, b);
        let bundle = compile_rows(vec![], vec![policy()], now).unwrap();
        CompiledPolicy::compile(&bundle).unwrap();
        assert!(
            bundle.data["timezones"]["Europe/Paris"]
                .as_array()
                .unwrap()
                .len()
                > 1
        );
    }
}
