//! The policy bundle compiler and publisher.
//!
//! From the database's agents and active policies it builds the data document the Rego
//! library evaluates (agents indexed by certificate fingerprint, policies by id), validates
//! the bundle with the filter's own core, gives it a persisted monotonic version and
//! publishes it to the ECDS streams. Identical inputs give byte-identical bundles.

use crate::config::{Gateway, Secret};
use crate::storage::{self, StoreError};
use filter_core::config::{AuditSink, Bundle, Mode, PluginConfig};
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
        Ok(snapshot)
    }
}

/// Builds the bundle (library modules + indexed data) from the database.
pub async fn compile(pool: &PgPool) -> Result<Bundle, StoreError> {
    let agents = storage::bundle::agents(pool).await?;
    let policies = storage::bundle::active_policies(pool).await?;
    let mut agent_index = Map::new();
    for a in agents {
        agent_index.insert(
            a.fingerprint,
            json!({
                "id": a.id,
                "tenant_id": a.tenant_id,
                "name": a.name,
                "status": a.status,
                "policies": a.policies,
            }),
        );
    }
    let mut policy_index = Map::new();
    for p in policies {
        policy_index.insert(
            p.id.to_string(),
            json!({
                "id": p.id,
                "tenant_id": p.tenant_id,
                "name": p.name,
                "priority": p.priority,
                "status": p.status,
                "mode": p.mode,
                "allowed_domains": p.allowed_domains,
                "blocked_domains": p.blocked_domains,
            }),
        );
    }
    let mut data = Map::new();
    data.insert("agents".into(), Value::Object(agent_index));
    data.insert("policies".into(), Value::Object(policy_index));
    Ok(Bundle {
        modules: CompiledPolicy::library_modules(),
        data: Value::Object(data),
    })
}
