//! Tenants, agents and policies.
//!
//! Every read and write of a tenant's resource takes a `scope`: `Some(tenant)` limits it
//! to that tenant (a resource of another tenant is not found), `None` is a platform
//! administrator's view of all tenants. Updates are optimistic: they name the version they
//! were based on and change the row only while it still has that version
//! (`UPDATE … WHERE id = $1 AND version = $2`), in one statement or one transaction.

use super::StoreError;
use crate::domain::AgentCertificate;
use crate::policy_spec::PolicySpec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    /// Lower-case hex SHA-256 of the DER certificate (unique across tenants).
    pub fingerprint: String,
    pub subject: String,
    pub sans: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// `pending`, `active`, `suspended` or `deactivated`.
    pub status: String,
    /// Bumped by every change; the `ETag`.
    pub version: i64,
    pub policy_ids: Vec<Uuid>,
    /// Key/value facts about the agent that rule conditions can test
    /// (`agent_metadata.<key>`).
    pub metadata: serde_json::Value,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Policy {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub priority: i32,
    /// `draft`, `active` or `archived`; only active policies are enforced.
    pub status: String,
    /// `enforce` or `dry_run`.
    pub mode: String,
    pub allowed_domains: Vec<String>,
    pub blocked_domains: Vec<String>,
    /// Rule conditions (see rego/README.md).
    pub rules: serde_json::Value,
    pub time_restrictions: Option<serde_json::Value>,
    pub rate_limit: Option<serde_json::Value>,
    pub custom_rego: Option<String>,
    /// Bumped by every change; the `ETag`.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Fields of a policy write.
#[derive(Debug, Clone)]
pub struct PolicyFields {
    pub name: String,
    pub priority: i32,
    pub status: String,
    pub mode: String,
    pub allowed_domains: Vec<String>,
    pub blocked_domains: Vec<String>,
    /// Normalised and validated.
    pub spec: PolicySpec,
}

/// Filters of an agent listing; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    pub tenant: Option<Uuid>,
    pub status: Option<String>,
    pub name_prefix: Option<String>,
    pub policy_id: Option<Uuid>,
}

/// Filters of a policy listing; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct PolicyFilter {
    pub tenant: Option<Uuid>,
    pub status: Option<String>,
    pub mode: Option<String>,
}

/// A page of a listing ordered by id (UUIDv7, so creation order): items after the cursor.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// Why a resource write did not happen, beyond the database's own errors.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version {current} is the current version")]
    Stale { current: i64 },
    #[error("the tenant has reached its limit of {limit} agents")]
    AgentLimit { limit: i64 },
    #[error("no such tenant")]
    NoTenant,
    #[error("unknown policy id for this tenant")]
    UnknownPolicy,
    #[error("the policy is still assigned to {agents} agent(s)")]
    Assigned { agents: i64 },
}

impl From<sqlx::Error> for ResourceError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err.into())
    }
}

const AGENT_COLUMNS: &str = "a.id, a.tenant_id, a.name, a.fingerprint, a.subject, a.sans,
    a.not_before, a.not_after, a.status, a.version, a.metadata, a.last_seen_at, a.created_at,
    a.updated_at,
    COALESCE((SELECT array_agg(policy_id ORDER BY policy_id) FROM agent_policies
              WHERE agent_id = a.id), '{}') AS policy_ids";

const POLICY_COLUMNS: &str = "id, tenant_id, name, priority, status, mode, allowed_domains,
    blocked_domains, rules, time_restrictions, rate_limit, custom_rego, version, created_at,
    updated_at";

// === tenants ===

pub async fn create_tenant(pool: &PgPool, name: &str) -> Result<Tenant, StoreError> {
    Ok(sqlx::query_as(
        "INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .fetch_one(pool)
    .await?)
}

pub async fn list_tenants(pool: &PgPool) -> Result<Vec<Tenant>, StoreError> {
    Ok(
        sqlx::query_as("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

pub async fn get_tenant(pool: &PgPool, id: Uuid) -> Result<Tenant, StoreError> {
    Ok(
        sqlx::query_as("SELECT id, name, created_at FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

pub async fn tenant_exists(pool: &PgPool, id: Uuid) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

// === agents ===

/// Registers a `pending` agent. The tenant's row is locked while its agents are counted,
/// so concurrent registrations cannot exceed `limit` (deactivated agents do not count).
pub async fn create_agent(
    pool: &PgPool,
    tenant: Uuid,
    name: &str,
    cert: &AgentCertificate,
    metadata: &serde_json::Value,
    limit: i64,
) -> Result<Agent, ResourceError> {
    let mut tx = crate::storage::begin(pool).await?;
    let locked: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.is_none() {
        return Err(ResourceError::NoTenant);
    }
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM agents WHERE tenant_id = $1 AND status <> 'deactivated'",
    )
    .bind(tenant)
    .fetch_one(&mut *tx)
    .await?;
    if count >= limit {
        return Err(ResourceError::AgentLimit { limit });
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO agents (id, tenant_id, name, fingerprint, subject, sans, not_before,
                             not_after, certificate_pem, status, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10)",
    )
    .bind(id)
    .bind(tenant)
    .bind(name)
    .bind(&cert.fingerprint)
    .bind(&cert.subject)
    .bind(&cert.sans)
    .bind(cert.not_before)
    .bind(cert.not_after)
    .bind(&cert.pem)
    .bind(metadata)
    .execute(&mut *tx)
    .await?;
    let agent = fetch_agent(&mut *tx, None, id).await?;
    tx.commit().await?;
    Ok(agent)
}

pub async fn get_agent(pool: &PgPool, scope: Option<Uuid>, id: Uuid) -> Result<Agent, StoreError> {
    fetch_agent(pool, scope, id).await
}

async fn fetch_agent<'e, E>(executor: E, scope: Option<Uuid>, id: Uuid) -> Result<Agent, StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents a
         WHERE a.id = $1 AND ($2::uuid IS NULL OR a.tenant_id = $2)"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(scope)
        .fetch_one(executor)
        .await?)
}

pub async fn list_agents(
    pool: &PgPool,
    filter: &AgentFilter,
    page: Page,
) -> Result<Vec<Agent>, StoreError> {
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents a
         WHERE ($1::uuid IS NULL OR a.tenant_id = $1)
           AND ($2::text IS NULL OR a.status = $2)
           AND ($3::text IS NULL OR starts_with(a.name, $3))
           AND ($4::uuid IS NULL OR EXISTS (SELECT 1 FROM agent_policies ap
                                            WHERE ap.agent_id = a.id AND ap.policy_id = $4))
           AND ($5::uuid IS NULL OR a.id > $5)
         ORDER BY a.id
         LIMIT $6"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(filter.tenant)
        .bind(&filter.status)
        .bind(&filter.name_prefix)
        .bind(filter.policy_id)
        .bind(page.after)
        .bind(page.limit)
        .fetch_all(pool)
        .await?)
}

/// Changes status and/or policy assignment of the agent at version `expected`, in one
/// transaction; the version check and the change are one conditional `UPDATE`.
/// `policy_ids` must belong to the agent's tenant.
pub async fn update_agent(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
    expected: i64,
    status: Option<&str>,
    policy_ids: Option<&[Uuid]>,
    metadata: Option<&serde_json::Value>,
) -> Result<Agent, ResourceError> {
    let mut tx = crate::storage::begin(pool).await?;
    let tenant: Option<Uuid> = sqlx::query_scalar(
        "UPDATE agents SET status = COALESCE($3, status), metadata = COALESCE($5, metadata),
                           version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 AND ($4::uuid IS NULL OR tenant_id = $4)
         RETURNING tenant_id",
    )
    .bind(id)
    .bind(expected)
    .bind(status)
    .bind(scope)
    .bind(metadata)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(tenant) = tenant else {
        return Err(missing_or_stale(&mut *tx, "agents", scope, id).await);
    };
    if let Some(policy_ids) = policy_ids {
        let owned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM policies WHERE tenant_id = $1 AND id = ANY($2)",
        )
        .bind(tenant)
        .bind(policy_ids)
        .fetch_one(&mut *tx)
        .await?;
        if owned != policy_ids.len() as i64 {
            return Err(ResourceError::UnknownPolicy);
        }
        sqlx::query("DELETE FROM agent_policies WHERE agent_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO agent_policies (agent_id, policy_id) SELECT $1, unnest($2::uuid[])",
        )
        .bind(id)
        .bind(policy_ids)
        .execute(&mut *tx)
        .await?;
    }
    let agent = fetch_agent(&mut *tx, None, id).await?;
    tx.commit().await?;
    Ok(agent)
}

/// Replaces the agent's certificate (rotation) at version `expected`.
pub async fn rotate_certificate(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
    expected: i64,
    cert: &AgentCertificate,
) -> Result<Agent, ResourceError> {
    let mut tx = crate::storage::begin(pool).await?;
    let updated: Option<Uuid> = sqlx::query_scalar(
        "UPDATE agents SET fingerprint = $3, subject = $4, sans = $5, not_before = $6,
                           not_after = $7, certificate_pem = $8, version = version + 1,
                           updated_at = now()
         WHERE id = $1 AND version = $2 AND ($9::uuid IS NULL OR tenant_id = $9)
         RETURNING id",
    )
    .bind(id)
    .bind(expected)
    .bind(&cert.fingerprint)
    .bind(&cert.subject)
    .bind(&cert.sans)
    .bind(cert.not_before)
    .bind(cert.not_after)
    .bind(&cert.pem)
    .bind(scope)
    .fetch_optional(&mut *tx)
    .await?;
    if updated.is_none() {
        return Err(missing_or_stale(&mut *tx, "agents", scope, id).await);
    }
    let agent = fetch_agent(&mut *tx, None, id).await?;
    tx.commit().await?;
    Ok(agent)
}

// === policies ===

pub async fn create_policy(
    pool: &PgPool,
    tenant: Uuid,
    fields: &PolicyFields,
) -> Result<Policy, StoreError> {
    let sql = format!(
        "INSERT INTO policies (id, tenant_id, name, priority, status, mode, allowed_domains,
                               blocked_domains, rules, time_restrictions, rate_limit,
                               custom_rego)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {POLICY_COLUMNS}"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(&fields.name)
        .bind(fields.priority)
        .bind(&fields.status)
        .bind(&fields.mode)
        .bind(&fields.allowed_domains)
        .bind(&fields.blocked_domains)
        .bind(serde_json::Value::Array(fields.spec.rules.clone()))
        .bind(&fields.spec.time_restrictions)
        .bind(&fields.spec.rate_limit)
        .bind(&fields.spec.custom_rego)
        .fetch_one(pool)
        .await?)
}

/// Replaces the policy's fields at version `expected` (one conditional `UPDATE`).
pub async fn update_policy(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
    expected: i64,
    fields: &PolicyFields,
) -> Result<Policy, ResourceError> {
    let sql = format!(
        "UPDATE policies SET name = $3, priority = $4, status = $5, mode = $6,
             allowed_domains = $7, blocked_domains = $8, rules = $10, time_restrictions = $11,
             rate_limit = $12, custom_rego = $13, version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 AND ($9::uuid IS NULL OR tenant_id = $9)
         RETURNING {POLICY_COLUMNS}"
    );
    let updated: Option<Policy> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(expected)
        .bind(&fields.name)
        .bind(fields.priority)
        .bind(&fields.status)
        .bind(&fields.mode)
        .bind(&fields.allowed_domains)
        .bind(&fields.blocked_domains)
        .bind(scope)
        .bind(serde_json::Value::Array(fields.spec.rules.clone()))
        .bind(&fields.spec.time_restrictions)
        .bind(&fields.spec.rate_limit)
        .bind(&fields.spec.custom_rego)
        .fetch_optional(pool)
        .await?;
    match updated {
        Some(policy) => Ok(policy),
        None => Err(missing_or_stale(pool, "policies", scope, id).await),
    }
}

/// Deletes a policy (at version `expected` when given). Refused while agents still have it
/// unless `force`; a forced delete unassigns it and bumps those agents' versions.
/// Returns the agents that lost the policy, with their new versions.
pub async fn delete_policy(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
    expected: Option<i64>,
    force: bool,
) -> Result<Vec<(Uuid, i64)>, ResourceError> {
    let mut tx = crate::storage::begin(pool).await?;
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM policies
         WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2) FOR UPDATE",
    )
    .bind(id)
    .bind(scope)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = version else {
        return Err(StoreError::NotFound.into());
    };
    if expected.is_some_and(|e| e != version) {
        return Err(ResourceError::Stale { current: version });
    }
    let agents: i64 =
        sqlx::query_scalar("SELECT count(*) FROM agent_policies WHERE policy_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
    if agents > 0 && !force {
        return Err(ResourceError::Assigned { agents });
    }
    let unassigned: Vec<(Uuid, i64)> = sqlx::query_as(
        "UPDATE agents SET version = version + 1, updated_at = now()
         WHERE id IN (SELECT agent_id FROM agent_policies WHERE policy_id = $1)
         RETURNING id, version",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM policies WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(unassigned)
}

pub async fn get_policy(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
) -> Result<Policy, StoreError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM policies
         WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(scope)
        .fetch_one(pool)
        .await?)
}

/// A policy in the shape the bundle compiler takes (for dry-run evaluation).
pub async fn policy_row(
    pool: &PgPool,
    scope: Option<Uuid>,
    id: Uuid,
) -> Result<super::bundle::PolicyRow, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, tenant_id, name, priority, status, mode, allowed_domains, blocked_domains,
                rules, time_restrictions, rate_limit, custom_rego
         FROM policies WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
    )
    .bind(id)
    .bind(scope)
    .fetch_one(pool)
    .await?)
}

pub async fn list_policies(
    pool: &PgPool,
    filter: &PolicyFilter,
    page: Page,
) -> Result<Vec<Policy>, StoreError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM policies
         WHERE ($1::uuid IS NULL OR tenant_id = $1)
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR mode = $3)
           AND ($4::uuid IS NULL OR id > $4)
         ORDER BY id
         LIMIT $5"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(filter.tenant)
        .bind(&filter.status)
        .bind(&filter.mode)
        .bind(page.after)
        .bind(page.limit)
        .fetch_all(pool)
        .await?)
}

/// After a conditional update matched no row: the row is gone (or another tenant's), or
/// its version moved on.
async fn missing_or_stale<'e, E>(
    executor: E,
    table: &'static str,
    scope: Option<Uuid>,
    id: Uuid,
) -> ResourceError
where
    E: sqlx::PgExecutor<'e>,
{
    let sql = format!(
        "SELECT version FROM {table} WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
    );
    let current: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(scope)
        .fetch_optional(executor)
        .await;
    match current {
        Ok(Some(current)) => ResourceError::Stale { current },
        Ok(None) => StoreError::NotFound.into(),
        Err(err) => err.into(),
    }
}
