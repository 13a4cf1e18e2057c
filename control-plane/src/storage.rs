//! Persistence: PostgreSQL through sqlx (and Redis for health). Only this module talks SQL.

pub mod audit;
pub mod bundle;
pub mod gateways;
pub mod resources;

use crate::config::Settings;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::Duration;

/// Migrations embedded at compile time from the workspace's `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Self::Unavailable(err),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::Conflict(db.constraint().unwrap_or("unique").to_owned())
            }
            _ => Self::Database(err),
        }
    }
}

/// `pool.begin()`, safe to cancel. In sqlx 0.9.0 a `begin` future dropped during the
/// `BEGIN` round trip leaves the pooled connection inside a server-side transaction that
/// nothing ends (sqlx issue #4393, fixed upstream after 0.9.0): the next borrower's
/// statements then run in it, invisible to everyone else and lost when the connection
/// closes. A handler's future is dropped whenever its client goes away (an Envoy audit
/// callout timing out, an admin closing the connection), so the `BEGIN` runs in a task of
/// its own; if nobody waits for it any more, the transaction is dropped there and sqlx
/// rolls it back before the connection is reused.
pub async fn begin(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    begin_with(pool, "BEGIN").await
}

/// [`begin`] with a statement of its own instead of `BEGIN` (an isolation level, say).
pub async fn begin_with(
    pool: &PgPool,
    statement: &'static str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let pool = pool.clone();
    #[allow(clippy::disallowed_methods)] // the sanctioned call
    tokio::spawn(async move { pool.begin_with(sqlx::AssertSqlSafe(statement)).await })
        .await
        .map_err(|_| sqlx::Error::WorkerCrashed)?
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    pub redis: Option<redis::aio::ConnectionManager>,
}

// === impl Store ===

impl Store {
    /// Connects lazily (the service starts even while the database is down), then migrates
    /// when the database is reachable.
    pub async fn connect(settings: &Settings) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.database.max_connections)
            .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
            .connect_lazy(settings.database.url.expose())
            .map_err(StoreError::from)?;
        MIGRATOR.run(&pool).await?;
        let redis = if settings.redis.url.is_empty() {
            None
        } else {
            match redis::Client::open(settings.redis.url.expose()) {
                Ok(client) => {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Duration::from_millis(500))
                        .set_response_timeout(Duration::from_millis(500))
                        .set_number_of_retries(1);
                    match client.get_connection_manager_with_config(config).await {
                        Ok(manager) => Some(manager),
                        Err(err) => {
                            tracing::warn!(error = %err, "redis unreachable at start; continuing without it");
                            None
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "redis url invalid; continuing without it");
                    None
                }
            }
        };
        Ok(Self { pool, redis })
    }

    pub async fn ping_db(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// `None` when Redis is not configured.
    pub async fn ping_redis(&self) -> Option<bool> {
        let mut conn = self.redis.clone()?;
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        Some(pong.is_ok())
    }
}
