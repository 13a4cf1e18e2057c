//! What the bundle compiler reads, and the persisted version sequence.

use super::StoreError;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub fingerprint: String,
    pub status: String,
    pub metadata: serde_json::Value,
    pub policies: Vec<Uuid>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PolicyRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub priority: i32,
    pub status: String,
    pub mode: String,
    pub allowed_domains: Vec<String>,
    pub blocked_domains: Vec<String>,
    pub rules: serde_json::Value,
    pub time_restrictions: Option<serde_json::Value>,
    pub rate_limit: Option<serde_json::Value>,
    pub custom_rego: Option<String>,
}

/// Every agent with its assigned policy ids, ordered for a deterministic bundle.
pub async fn agents(pool: &PgPool) -> Result<Vec<AgentRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT a.id, a.tenant_id, a.name, a.fingerprint, a.status, a.metadata,
                COALESCE(array_agg(ap.policy_id ORDER BY ap.policy_id)
                         FILTER (WHERE ap.policy_id IS NOT NULL), '{}') AS policies
         FROM agents a LEFT JOIN agent_policies ap ON ap.agent_id = a.id
         GROUP BY a.id ORDER BY a.fingerprint",
    )
    .fetch_all(pool)
    .await?)
}

/// Active policies (the only ones the filter evaluates).
pub async fn active_policies(pool: &PgPool) -> Result<Vec<PolicyRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, tenant_id, name, priority, status, mode, allowed_domains, blocked_domains,
                rules, time_restrictions, rate_limit, custom_rego
         FROM policies WHERE status = 'active' ORDER BY id",
    )
    .fetch_all(pool)
    .await?)
}

/// The version for fleet `gateway`'s bundle with this content hash: the fleet's latest
/// version when its hash is the same, otherwise a new one. Versions come from one global
/// sequence, so a new version is higher than every version of every fleet before it.
pub async fn version_for(
    pool: &PgPool,
    gateway: &str,
    content_hash: &str,
) -> Result<i64, StoreError> {
    let mut tx = crate::storage::begin(pool).await?;
    // Serialise version allocation across replicas.
    sqlx::query("LOCK TABLE bundle_versions IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let latest: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, content_hash FROM bundle_versions WHERE gateway = $1
         ORDER BY version DESC LIMIT 1",
    )
    .bind(gateway)
    .fetch_optional(&mut *tx)
    .await?;
    let version = match latest {
        Some((version, hash)) if hash == content_hash => version,
        _ => {
            sqlx::query_scalar(
                "INSERT INTO bundle_versions (content_hash, gateway) VALUES ($1, $2)
                 RETURNING version",
            )
            .bind(content_hash)
            .bind(gateway)
            .fetch_one(&mut *tx)
            .await?
        }
    };
    tx.commit().await?;
    Ok(version)
}
