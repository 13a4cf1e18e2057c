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
