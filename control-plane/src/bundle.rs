//! The policy bundle compiler and publisher.
//!
//! From the database's agents and active policies it builds, for every gateway fleet, the
//! data document the Rego library evaluates over the tenants that fleet serves (agents
//! indexed by certificate fingerprint, policies by id, domains by exact name and wildcard
//! suffix), validates each bundle with the filter's own core, gives it a persisted version
//! that is monotonic per fleet and publishes the set to the ECDS streams. Identical inputs
//! give byte-identical bundles.

use crate::config::{Gateway, Secret};
use crate::storage::{self, StoreError};
use filter_core::config::{AuditSink, Bundle, Mode, PluginConfig, RegoModule};
use filter_core::data::EntryCache;
use filter_core::policy::{CompiledPolicy, PolicyError};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

/// The `version_info` of the configuration a node of an unknown fleet gets.
pub const DENY_ALL_VERSION: &str = "deny-all";

/// A published bundle, ready to be sent to Envoy.
#[derive(Debug)]
pub struct Snapshot {
    pub version: i64,
    pub content_hash: String,
    /// The filter's plugin configuration JSON (contains the ingest credential: never log).
    pub plugin_config: String,
    /// The fail-closed configuration for nodes whose fleet is not registered.
    pub deny_all: bool,
    /// This configuration as deltas against the earlier ones streams sent last, by their
    /// version and content hash ([`Snapshot::delta_from`]).
    deltas: std::sync::Mutex<Vec<DeltaFrom>>,
}

/// A base's version and content hash, and the delta from it (`None`: in full).
type DeltaFrom = (i64, String, Option<Arc<str>>);

/// Deltas to one snapshot kept for different bases: the streams of a fleet are mostly
/// at the previous version, one that fell behind at an older one.
const DELTA_BASES: usize = 4;

// === impl Snapshot ===

impl Snapshot {
    pub fn new(version: i64, content_hash: String, plugin_config: String, deny_all: bool) -> Self {
        Self {
            version,
            content_hash,
            plugin_config,
            deny_all,
            deltas: std::sync::Mutex::default(),
        }
    }

    /// This configuration as a delta against `base` (`None`: send it in full), computed
    /// with `compute` once per base for all the streams that push it: each computation
    /// parses both configurations, ≈ 430 KB each for 1,000 agents.
    pub fn delta_from(
        &self,
        base: &Snapshot,
        compute: impl FnOnce() -> Option<String>,
    ) -> Option<Arc<str>> {
        // A poisoned lock only means another stream panicked while computing: recompute.
        let mut deltas = self
            .deltas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, delta)) = deltas
            .iter()
            .find(|(v, hash, _)| *v == base.version && *hash == base.content_hash)
        {
            return delta.clone();
        }
        let delta: Option<Arc<str>> = compute().map(Arc::from);
        if deltas.len() >= DELTA_BASES {
            deltas.remove(0);
        }
        deltas.push((base.version, base.content_hash.clone(), delta.clone()));
        delta
    }

    /// What ECDS sends as `version_info` (and Envoy acknowledges).
    pub fn version_info(&self) -> String {
        if self.deny_all {
            DENY_ALL_VERSION.to_owned()
        } else {
            self.version.to_string()
        }
    }
}

/// Everything published at one moment: one bundle per registered fleet.
#[derive(Debug, Default)]
pub struct Published {
    pub fleets: BTreeMap<String, Arc<Snapshot>>,
    /// The tenants each fleet serves.
    pub tenants: BTreeMap<String, Vec<Uuid>>,
}

// === impl Published ===

impl Published {
    pub fn fleet(&self, name: &str) -> Option<&Arc<Snapshot>> {
        self.fleets.get(name)
    }

    /// The highest version published to any fleet (versions share one sequence).
    pub fn latest_version(&self) -> Option<i64> {
        self.fleets.values().map(|s| s.version).max()
    }

    /// The highest version among the fleets serving `tenant`: the bundle that carries the
    /// tenant's latest change. `None` while no fleet serves it.
    pub fn version_for_tenant(&self, tenant: Uuid) -> Option<i64> {
        self.tenants
            .iter()
            .filter(|(_, tenants)| tenants.contains(&tenant))
            .filter_map(|(fleet, _)| self.fleets.get(fleet).map(|s| s.version))
            .max()
    }

    fn same_as(&self, other: &Published) -> bool {
        self.tenants == other.tenants
            && self.fleets.len() == other.fleets.len()
            && self
                .fleets
                .iter()
                .zip(&other.fleets)
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y))
    }
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
    tx: watch::Sender<Option<Arc<Published>>>,
    deny_all: Arc<Snapshot>,
    /// Serialises rebuilds; holds each fleet's prepared bundle entries, so validating a
    /// change re-prepares only the agents and policies that changed.
    lock: Mutex<HashMap<String, EntryCache>>,
    /// Background rebuilds that failed (the alert metric).
    pub failures: std::sync::atomic::AtomicU64,
    /// Bundles published since start.
    pub publishes: std::sync::atomic::AtomicU64,
}

// === impl Publisher ===

impl Publisher {
    pub fn new(pool: PgPool, gateway: Gateway, ingest_token: Secret) -> Self {
        let (tx, _) = watch::channel(None);
        // No bundle and no audit credential: a node that does not say which fleet it
        // belongs to learns nothing about any tenant.
        let deny_all = PluginConfig {
            base: None,
            version: DENY_ALL_VERSION.to_owned(),
            mode: Mode::DenyAll,
            bundle: None,
            audit: None,
        };
        let plugin_config = serde_json::to_string(&deny_all).unwrap_or_else(|_| {
            format!("{{\"version\":\"{DENY_ALL_VERSION}\",\"mode\":\"denyAll\"}}")
        });
        Self {
            pool,
            gateway,
            ingest_token,
            tx,
            deny_all: Arc::new(Snapshot::new(
                0,
                hex::encode(Sha256::digest(plugin_config.as_bytes())),
                plugin_config,
                true,
            )),
            lock: Mutex::new(HashMap::new()),
            failures: std::sync::atomic::AtomicU64::new(0),
            publishes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.tx.subscribe()
    }

    /// What is published now; `None` before the first successful build.
    pub fn current(&self) -> Option<Arc<Published>> {
        self.tx.borrow().clone()
    }

    /// The highest version published to any fleet.
    pub fn latest_version(&self) -> Option<i64> {
        self.current().and_then(|p| p.latest_version())
    }

    /// The configuration for a node whose fleet is not registered (fail closed).
    pub fn deny_all(&self) -> Arc<Snapshot> {
        self.deny_all.clone()
    }

    /// What a node of `fleet` gets now: its fleet's bundle, or the deny-all configuration
    /// when the fleet is not registered. `None` before the first build.
    pub fn for_fleet(&self, fleet: &str) -> Option<Arc<Snapshot>> {
        let published = self.current()?;
        Some(
            published
                .fleet(fleet)
                .cloned()
                .unwrap_or_else(|| self.deny_all()),
        )
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Rebuilds every fleet's bundle from the database and publishes the fleets whose
    /// content changed. All or nothing: when one fleet's bundle does not validate, nothing
    /// is published. Serialised, so concurrent writes cannot publish out of order.
    pub async fn rebuild(&self) -> Result<Arc<Published>, BundleError> {
        let mut caches = self.lock.lock().await;
        let started = std::time::Instant::now();
        let fleets = storage::gateways::list(&self.pool).await?;
        let agents = storage::bundle::agents(&self.pool).await?;
        let policies = storage::bundle::active_policies(&self.pool).await?;
        let read_ms = started.elapsed().as_secs_f64() * 1e3;
        let now_s = chrono::Utc::now().timestamp();
        let current = self.current();
        let mut next = Published::default();
        for fleet in fleets {
            let serves: BTreeSet<Uuid> = fleet.tenant_ids.iter().copied().collect();
            let bundle = compile_rows(
                agents
                    .iter()
                    .filter(|a| serves.contains(&a.tenant_id))
                    .cloned()
                    .collect(),
                policies
                    .iter()
                    .filter(|p| serves.contains(&p.tenant_id))
                    .cloned()
                    .collect(),
                now_s,
            )?;
            let bundle_json =
                serde_json::to_vec(&bundle).map_err(|e| PolicyError::Data(e.to_string()))?;
            let content_hash = hex::encode(Sha256::digest(&bundle_json));
            let unchanged = current
                .as_ref()
                .and_then(|c| c.fleet(&fleet.name))
                .filter(|s| s.content_hash == content_hash)
                .cloned();
            let snapshot = match unchanged {
                Some(snapshot) => snapshot,
                None => {
                    let compiled = std::time::Instant::now();
                    let cache = caches.entry(fleet.name.clone()).or_default();
                    CompiledPolicy::compile_with(&bundle, cache).inspect_err(|e| {
                        tracing::error!(fleet = %fleet.name, error = %e, "fleet bundle does not validate");
                    })?;
                    let validate_ms = compiled.elapsed().as_secs_f64() * 1e3;
                    let version =
                        storage::bundle::version_for(&self.pool, &fleet.name, &content_hash)
                            .await?;
                    let snapshot = Arc::new(self.snapshot(version, content_hash, bundle)?);
                    tracing::info!(
                        fleet = %fleet.name,
                        version,
                        tenants = serves.len(),
                        bytes = snapshot.plugin_config.len(),
                        read_ms,
                        validate_ms,
                        total_ms = started.elapsed().as_secs_f64() * 1e3,
                        "policy bundle published"
                    );
                    self.publishes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    snapshot
                }
            };
            next.fleets.insert(fleet.name.clone(), snapshot);
            next.tenants.insert(fleet.name, fleet.tenant_ids);
        }
        caches.retain(|name, _| next.fleets.contains_key(name));
        if let Some(current) = current
            && current.same_as(&next)
        {
            return Ok(current);
        }
        let next = Arc::new(next);
        self.tx.send_replace(Some(next.clone()));
        Ok(next)
    }

    fn snapshot(
        &self,
        version: i64,
        content_hash: String,
        bundle: Bundle,
    ) -> Result<Snapshot, BundleError> {
        let config = PluginConfig {
            base: None,
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
        Ok(Snapshot::new(version, content_hash, plugin_config, false))
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
    /// Publishes `plugin_config` without validating it, under a new version, to every
    /// registered fleet. Only the testing hook calls this (to exercise Envoy's NACK path).
    pub async fn publish_unvalidated(
        &self,
        plugin_config: String,
    ) -> Result<Arc<Published>, BundleError> {
        let _guard = self.lock.lock().await;
        let content_hash = hex::encode(Sha256::digest(plugin_config.as_bytes()));
        let current = self.current().unwrap_or_default();
        let mut next = Published {
            fleets: BTreeMap::new(),
            tenants: current.tenants.clone(),
        };
        for fleet in current.fleets.keys() {
            let version = storage::bundle::version_for(&self.pool, fleet, &content_hash).await?;
            tracing::warn!(
                fleet = %fleet,
                version,
                "unvalidated bundle published through the testing hook"
            );
            next.fleets.insert(
                fleet.clone(),
                Arc::new(Snapshot::new(
                    version,
                    content_hash.clone(),
                    plugin_config.clone(),
                    false,
                )),
            );
        }
        let next = Arc::new(next);
        self.tx.send_replace(Some(next.clone()));
        self.publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(next)
    }
}

/// Builds the bundle (library modules, custom modules, indexed data with timezone offset
/// tables) of every tenant from the database (the dry-run evaluation's view).
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
        let (allowed_exact, allowed_suffix) = filter_core::data::index_domains(&p.allowed_domains);
        let (blocked_exact, blocked_suffix) = filter_core::data::index_domains(&p.blocked_domains);
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
                "allowed_exact": allowed_exact,
                "allowed_suffix": allowed_suffix,
                "blocked_exact": blocked_exact,
                "blocked_suffix": blocked_suffix,
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

    /// The streams pushing one snapshot compute its delta against a base once, and a
    /// few bases are kept.
    #[test]
    fn a_delta_is_computed_once_per_base() {
        let snapshot = |v: i64| Snapshot::new(v, format!("h{v}"), format!("c{v}"), false);
        let next = snapshot(9);
        let computed = std::cell::Cell::new(0);
        let compute = |text: Option<&str>| {
            computed.set(computed.get() + 1);
            text.map(str::to_owned)
        };
        let base = snapshot(8);
        let first = next.delta_from(&base, || compute(Some("d8")));
        let again = next.delta_from(&base, || compute(Some("other")));
        assert_eq!(computed.get(), 1);
        assert!(Arc::ptr_eq(
            first.as_ref().unwrap(),
            again.as_ref().unwrap()
        ));
        // "In full" is remembered too; other bases get their own.
        assert_eq!(next.delta_from(&snapshot(7), || compute(None)), None);
        assert_eq!(next.delta_from(&snapshot(7), || compute(Some("x"))), None);
        assert_eq!(computed.get(), 2);
        for v in 1..=DELTA_BASES as i64 {
            next.delta_from(&snapshot(v), || compute(Some("older")));
        }
        assert_eq!(computed.get(), 2 + DELTA_BASES);
        // The oldest went: 8 is computed again.
        assert_eq!(
            next.delta_from(&base, || compute(Some("d8"))).as_deref(),
            Some("d8")
        );
        assert_eq!(computed.get(), 3 + DELTA_BASES);
    }

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
            allowed_domains: vec!["a.example".into(), "*.b.example".into()],
            blocked_domains: vec!["x.b.example".into()],
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
        let compiled = &bundle.data["policies"][uuid::Uuid::from_u128(7).to_string()];
        assert_eq!(compiled["allowed_exact"], json!({"a.example": true}));
        assert_eq!(compiled["allowed_suffix"], json!({"b.example": true}));
        assert_eq!(compiled["blocked_exact"], json!({"x.b.example": true}));
        assert_eq!(compiled["blocked_suffix"], json!({}));
        assert!(
            bundle.data["timezones"]["Europe/Paris"]
                .as_array()
                .unwrap()
                .len()
                > 1
        );
    }
}
