//! Persisting chained audit entries: append under the per-tenant head lock, read back in
//! sequence order.

use super::StoreError;
use crate::audit::chain::{self, ChainEntry, StoredEntry};
use crate::audit::ingest::ValidBatch;
use futures::TryStreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The outcome of an append.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored: how many entries.
    Stored(usize),
    /// This batch id was stored before; nothing was written.
    Duplicate,
}

/// Stores a validated batch atomically: all its entries, or none.
///
/// Per tenant the chain head row is locked (`FOR UPDATE`, in tenant-id order so two
/// batches never deadlock), so concurrent requests and replicas append one after another
/// without forks or gaps.
pub async fn append_batch(pool: &PgPool, batch: ValidBatch) -> Result<Appended, StoreError> {
    let mut tx = pool.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO audit_batches (batch_id, entry_count) VALUES ($1, $2)
         ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(batch.batch_id)
    .bind(i32::try_from(batch.entry_count).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fresh == 0 {
        tx.rollback().await?;
        return Ok(Appended::Duplicate);
    }
    for (tenant, entries) in batch.tenants {
        append_tenant(&mut tx, tenant, entries).await?;
    }
    if !batch.agent_ids.is_empty() {
        sqlx::query("UPDATE agents SET last_seen_at = now() WHERE id = ANY($1)")
            .bind(&batch.agent_ids)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Appended::Stored(batch.entry_count))
}

async fn append_tenant(
    tx: &mut Transaction<'static, Postgres>,
    tenant: Uuid,
    mut entries: Vec<ChainEntry>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_chain_heads (tenant_id, sequence_number, current_hash)
         VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(hex::encode(chain::GENESIS))
    .execute(&mut **tx)
    .await?;
    let (head_seq, head_hash): (i64, String) = sqlx::query_as(
        "SELECT sequence_number, current_hash FROM audit_chain_heads
         WHERE tenant_id = $1 FOR UPDATE",
    )
    .bind(tenant)
    .fetch_one(&mut **tx)
    .await?;
    let head_hash = chain::parse_hash(&head_hash).unwrap_or(chain::GENESIS);
    for (offset, entry) in entries.iter_mut().enumerate() {
        entry.sequence_number = head_seq + 1 + offset as i64;
    }
    let (stored, last) = chain::append(head_hash, entries);
    let new_head = head_seq + stored.len() as i64;
    insert_entries(tx, &stored).await?;
    sqlx::query(
        "UPDATE audit_chain_heads SET sequence_number = $2, current_hash = $3 WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(new_head)
    .bind(hex::encode(last))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One multi-row insert through `UNNEST` of column arrays.
async fn insert_entries(
    tx: &mut Transaction<'static, Postgres>,
    stored: &[StoredEntry],
) -> Result<(), StoreError> {
    macro_rules! column {
        ($f:expr) => {
            stored.iter().map($f).collect::<Vec<_>>()
        };
    }
    sqlx::query(
        "INSERT INTO audit_entries (tenant_id, sequence_number, entry_id, timestamp_ns, ts, kind,
            agent_id, agent_fingerprint, agent_subject, domain, method, path, user_agent,
            source_ip, decision, reason, policy_id, config_version, previous_hash, current_hash)
         SELECT t, s, e, n, to_timestamp(n / 1e9), k, a, fp, sub, d, m, p, ua, ip, dec, r, pol, cv, ph, ch
         FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::bigint[], $5::text[], $6::uuid[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
            $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[])
            AS x(t, s, e, n, k, a, fp, sub, d, m, p, ua, ip, dec, r, pol, cv, ph, ch)",
    )
    .bind(column!(|s| s.entry.tenant_id))
    .bind(column!(|s| s.entry.sequence_number))
    .bind(column!(|s| s.entry.entry_id))
    .bind(column!(|s| s.entry.timestamp_ns))
    .bind(column!(|s| s.entry.kind.clone()))
    .bind(column!(|s| s.entry.agent_id))
    .bind(column!(|s| s.entry.agent_fingerprint.clone()))
    .bind(column!(|s| s.entry.agent_subject.clone()))
    .bind(column!(|s| s.entry.domain.clone()))
    .bind(column!(|s| s.entry.method.clone()))
    .bind(column!(|s| s.entry.path.clone()))
    .bind(column!(|s| s.entry.user_agent.clone()))
    .bind(column!(|s| s.entry.source_ip.clone()))
    .bind(column!(|s| s.entry.decision.clone()))
    .bind(column!(|s| s.entry.reason.clone()))
    .bind(column!(|s| s.entry.policy_id.clone()))
    .bind(column!(|s| s.entry.config_version.clone()))
    .bind(column!(|s| s.previous_hash.clone()))
    .bind(column!(|s| s.current_hash.clone()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant_id: Uuid,
    sequence_number: i64,
    entry_id: Uuid,
    timestamp_ns: i64,
    kind: String,
    agent_id: Option<Uuid>,
    agent_fingerprint: String,
    agent_subject: String,
    domain: String,
    method: String,
    path: String,
    user_agent: String,
    source_ip: String,
    decision: String,
    reason: String,
    policy_id: Option<String>,
    config_version: String,
    previous_hash: String,
    current_hash: String,
}

impl From<Row> for StoredEntry {
    fn from(r: Row) -> Self {
        StoredEntry {
            entry: ChainEntry {
                tenant_id: r.tenant_id,
                sequence_number: r.sequence_number,
                entry_id: r.entry_id,
                timestamp_ns: r.timestamp_ns,
                kind: r.kind,
                agent_id: r.agent_id,
                agent_fingerprint: r.agent_fingerprint,
                agent_subject: r.agent_subject,
                domain: r.domain,
                method: r.method,
                path: r.path,
                user_agent: r.user_agent,
                source_ip: r.source_ip,
                decision: r.decision,
                reason: r.reason,
                policy_id: r.policy_id,
                config_version: r.config_version,
            },
            previous_hash: r.previous_hash,
            current_hash: r.current_hash,
        }
    }
}

/// The recorded head sequence of a tenant's chain, if it has one.
pub async fn head(pool: &PgPool, tenant: Uuid) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT sequence_number FROM audit_chain_heads WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_optional(pool)
            .await?,
    )
}

/// Streams a tenant's entries in sequence order into `visit` (constant memory).
pub async fn for_each_entry(
    pool: &PgPool,
    tenant: Uuid,
    mut visit: impl FnMut(StoredEntry),
) -> Result<(), StoreError> {
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT tenant_id, sequence_number, entry_id, timestamp_ns, kind, agent_id,
                agent_fingerprint, agent_subject, domain, method, path, user_agent, source_ip,
                decision, reason, policy_id, config_version, previous_hash, current_hash
         FROM audit_entries WHERE tenant_id = $1 ORDER BY sequence_number",
    )
    .bind(tenant)
    .fetch(pool);
    while let Some(row) = rows.try_next().await? {
        visit(row.into());
    }
    Ok(())
}
