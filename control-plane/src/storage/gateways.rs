//! Gateway fleets: which tenants each fleet of Envoys serves.

use super::StoreError;
use super::resources::ResourceError;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A fleet of Envoy gateways (the nodes whose `node.cluster` is `name`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Gateway {
    pub name: String,
    /// The tenants whose agents and policies this fleet's bundle carries, sorted.
    pub tenant_ids: Vec<Uuid>,
    /// Bumped by every change; the `ETag`.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The fleet query with its tenants, followed by `$tail`.
macro_rules! select {
    ($tail:literal) => {
        concat!(
            "SELECT g.name, g.version, g.created_at, g.updated_at,
                    COALESCE(array_agg(gt.tenant_id ORDER BY gt.tenant_id)
                             FILTER (WHERE gt.tenant_id IS NOT NULL), '{}') AS tenant_ids
             FROM gateways g LEFT JOIN gateway_tenants gt ON gt.gateway = g.name ",
            $tail
        )
    };
}

/// Every fleet, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<Gateway>, StoreError> {
    Ok(sqlx::query_as(select!("GROUP BY g.name ORDER BY g.name"))
        .fetch_all(pool)
        .await?)
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Gateway, StoreError> {
    Ok(sqlx::query_as(select!("WHERE g.name = $1 GROUP BY g.name"))
        .bind(name)
        .fetch_one(pool)
        .await?)
}

/// Creates the fleet (`expected` is `None`) or replaces its tenants while it still has
/// version `expected`, in one transaction. `tenants` must be sorted and deduplicated.
pub async fn put(
    pool: &PgPool,
    name: &str,
    expected: Option<i64>,
    tenants: &[Uuid],
) -> Result<Gateway, ResourceError> {
    let mut tx = crate::storage::begin(pool)
        .await
        .map_err(StoreError::from)?;
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id = ANY($1)")
        .bind(tenants)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    if known != tenants.len() as i64 {
        return Err(ResourceError::NoTenant);
    }
    match expected {
        None => {
            sqlx::query("INSERT INTO gateways (name) VALUES ($1)")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        Some(version) => {
            let updated: Option<i64> = sqlx::query_scalar(
                "UPDATE gateways SET version = version + 1, updated_at = now()
                 WHERE name = $1 AND version = $2 RETURNING version",
            )
            .bind(name)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            if updated.is_none() {
                let current: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM gateways WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                return Err(match current {
                    Some(current) => ResourceError::Stale { current },
                    None => StoreError::NotFound.into(),
                });
            }
            sqlx::query("DELETE FROM gateway_tenants WHERE gateway = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
    }
    sqlx::query("INSERT INTO gateway_tenants (gateway, tenant_id) SELECT $1, unnest($2::uuid[])")
        .bind(name)
        .bind(tenants)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    let gateway = sqlx::query_as(select!("WHERE g.name = $1 GROUP BY g.name"))
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(gateway)
}

/// Deletes the fleet (when it still has version `expected`, if given).
pub async fn delete(pool: &PgPool, name: &str, expected: Option<i64>) -> Result<(), ResourceError> {
    let deleted: Option<i64> = sqlx::query_scalar(
        "DELETE FROM gateways WHERE name = $1 AND ($2::bigint IS NULL OR version = $2)
         RETURNING version",
    )
    .bind(name)
    .bind(expected)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)?;
    if deleted.is_some() {
        return Ok(());
    }
    let current: Option<i64> = sqlx::query_scalar("SELECT version FROM gateways WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::from)?;
    Err(match current {
        Some(current) => ResourceError::Stale { current },
        None => StoreError::NotFound.into(),
    })
}
