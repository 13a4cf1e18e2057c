//! Taking checkpoints: of one tenant's head on demand, and periodically of every head
//! that moved since its last checkpoint.

use super::AuditKeys;
use super::chain;
use super::checkpoint::{Checkpoint, CheckpointSigner};
use crate::storage::StoreError;
use crate::storage::audit as store;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Signs and stores the current head of `tenant`'s chain; `None` when the chain is empty.
pub async fn checkpoint_tenant(
    pool: &PgPool,
    signer: &CheckpointSigner,
    tenant: Uuid,
) -> Result<Option<Checkpoint>, StoreError> {
    let Some((sequence, hash)) = store::chain_head(pool, tenant).await? else {
        return Ok(None);
    };
    if sequence == 0 {
        return Ok(None);
    }
    let head = chain::parse_hash(&hash).ok_or_else(|| {
        StoreError::Database(sqlx::Error::Protocol(format!(
            "audit chain head of tenant {tenant} is not a hash"
        )))
    })?;
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let checkpoint = signer.sign(tenant, sequence, &head, now);
    store::insert_checkpoint(pool, &checkpoint).await.map(Some)
}

/// Checkpoints every chain head that moved, every `interval`, until the process ends.
/// Failures are logged and counted; the next round retries.
pub async fn run(pool: PgPool, keys: Arc<AuditKeys>, interval: Duration) {
    let Some(signer) = keys.checkpoint_signer.as_ref() else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut failures: u64 = 0;
    loop {
        ticker.tick().await;
        let tenants = match store::heads_without_checkpoint(&pool).await {
            Ok(tenants) => tenants,
            Err(err) => {
                failures += 1;
                tracing::warn!(error = %err, failures, "audit checkpoint round failed");
                continue;
            }
        };
        let mut taken = 0;
        for tenant in tenants {
            match checkpoint_tenant(&pool, signer, tenant).await {
                Ok(Some(_)) => taken += 1,
                Ok(None) => {}
                Err(err) => {
                    failures += 1;
                    tracing::warn!(tenant_id = %tenant, error = %err, failures, "audit checkpoint failed");
                }
            }
        }
        if taken > 0 {
            tracing::info!(checkpoints = taken, "audit chain heads checkpointed");
        }
    }
}
