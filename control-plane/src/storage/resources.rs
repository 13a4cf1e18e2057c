//! Tenants, agents and policies.

use super::StoreError;
use crate::domain::AgentCertificate;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Agent {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub fingerprint: String,
    pub subject: String,
    pub sans: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub status: String,
    pub version: i64,
    pub policy_ids: Vec<Uuid>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Policy {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub priority: i32,
    pub status: String,
    pub mode: String,
    pub allowed_domains: Vec<String>,
    pub blocked_domains: Vec<String>,
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
}

const AGENT_COLUMNS: &str = "a.id, a.tenant_id, a.name, a.fingerprint, a.subject, a.sans,
    a.not_before, a.not_after, a.status, a.version, a.last_seen_at, a.created_at, a.updated_at,
    COALESCE((SELECT array_agg(policy_id ORDER BY policy_id) FROM agent_policies
              WHERE agent_id = a.id), '{}') AS policy_ids";

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

pub async fn tenant_exists(pool: &PgPool, id: Uuid) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

pub async fn create_agent(
    pool: &PgPool,
    tenant: Uuid,
    name: &str,
    cert: &AgentCertificate,
) -> Result<Agent, StoreError> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO agents (id, tenant_id, name, fingerprint, subject, sans, not_before,
                             not_after, certificate_pem, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending')",
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
    .execute(pool)
    .await?;
    get_agent(pool, id).await
}

pub async fn get_agent(pool: &PgPool, id: Uuid) -> Result<Agent, StoreError> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE a.id = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await?)
}

pub async fn list_agents(pool: &PgPool, tenant: Uuid) -> Result<Vec<Agent>, StoreError> {
    let sql =
        format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE a.tenant_id = $1 ORDER BY a.name");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .fetch_all(pool)
        .await?)
}

/// Updates status and/or policy assignment in one transaction, bumping the version.
/// `policy_ids` must belong to the agent's tenant (checked here).
pub async fn update_agent(
    pool: &PgPool,
    id: Uuid,
    status: Option<&str>,
    policy_ids: Option<&[Uuid]>,
) -> Result<Agent, StoreError> {
    let mut tx = pool.begin().await?;
    let tenant: Uuid = sqlx::query_scalar("SELECT tenant_id FROM agents WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if let Some(status) = status {
        sqlx::query("UPDATE agents SET status = $2 WHERE id = $1")
            .bind(id)
            .bind(status)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(policy_ids) = policy_ids {
        let owned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM policies WHERE tenant_id = $1 AND id = ANY($2)",
        )
        .bind(tenant)
        .bind(policy_ids)
        .fetch_one(&mut *tx)
        .await?;
        if owned != policy_ids.len() as i64 {
            return Err(StoreError::NotFound);
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
    sqlx::query("UPDATE agents SET version = version + 1, updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    get_agent(pool, id).await
}

const POLICY_COLUMNS: &str = "id, tenant_id, name, priority, status, mode, allowed_domains,
    blocked_domains, version, created_at, updated_at";

pub async fn create_policy(
    pool: &PgPool,
    tenant: Uuid,
    fields: &PolicyFields,
) -> Result<Policy, StoreError> {
    let sql = format!(
        "INSERT INTO policies (id, tenant_id, name, priority, status, mode, allowed_domains,
                               blocked_domains)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {POLICY_COLUMNS}"
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
        .fetch_one(pool)
        .await?)
}

pub async fn update_policy(
    pool: &PgPool,
    id: Uuid,
    fields: &PolicyFields,
) -> Result<Policy, StoreError> {
    let sql = format!(
        "UPDATE policies SET name = $2, priority = $3, status = $4, mode = $5,
             allowed_domains = $6, blocked_domains = $7, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {POLICY_COLUMNS}"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(&fields.name)
        .bind(fields.priority)
        .bind(&fields.status)
        .bind(&fields.mode)
        .bind(&fields.allowed_domains)
        .bind(&fields.blocked_domains)
        .fetch_one(pool)
        .await?)
}

pub async fn get_policy(pool: &PgPool, id: Uuid) -> Result<Policy, StoreError> {
    let sql = format!("SELECT {POLICY_COLUMNS} FROM policies WHERE id = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await?)
}

pub async fn list_policies(pool: &PgPool, tenant: Uuid) -> Result<Vec<Policy>, StoreError> {
    let sql = format!("SELECT {POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 ORDER BY name");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .fetch_all(pool)
        .await?)
}
