//! Persisting chained audit entries: append under the per-tenant head lock, read back in
//! sequence order, list with filters, stream exports; store and read signed checkpoints.

pub mod analytics;
pub mod retention;

use super::StoreError;
use crate::audit::chain::{self, ChainEntry, EntryFields, StoredEntry};
use crate::audit::checkpoint::Checkpoint;
use crate::audit::export::ExportRecord;
use crate::audit::ingest::ValidBatch;
use crate::audit::signing::{EntrySignature, HmacKeyring};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

/// The outcome of an append.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored: how many entries of each tenant (tenants whose part was stored before
    /// are not listed).
    Stored(Vec<(Uuid, usize)>),
    /// This batch id was stored before; nothing was written.
    Duplicate,
}

/// How many parts of one batch are appended at once.
const PARALLEL_PARTS: usize = 4;

/// Stores a validated batch, each tenant's entries atomically and exactly once.
///
/// A batch is stored in parts of whole tenants ([`ValidBatch::into_tenant_parts`]: at
/// least 250 entries each, so a small batch is one part, claimed under the batch id).
/// The parts of a large batch spanning tenants are transactions of their own, claimed
/// under ids derived from the batch id and their first tenant, appended concurrently: a
/// part locks only its tenants' chain heads, so batches that span the same tenants no
/// longer wait for each other's whole transaction. If a part fails the error is returned
/// (503) and the filter resends the batch; the parts already stored are then recognised
/// and skipped. A part is also skipped when the whole batch id was claimed by a control
/// plane that stored batches whole.
pub async fn append_batch(
    pool: &PgPool,
    batch: ValidBatch,
    keys: &HmacKeyring,
) -> Result<Appended, StoreError> {
    use futures::StreamExt;
    let whole = batch.batch_id;
    let mut parts = batch.into_tenant_parts();
    if parts.len() == 1
        && let Some(part) = parts.pop()
    {
        return append_part(pool, part, whole, keys).await;
    }
    // Every part runs to its end (no part is cancelled half-way because another failed).
    let outcomes: Vec<Result<Appended, StoreError>> = futures::stream::iter(parts)
        .map(|part| append_part(pool, part, whole, keys))
        .buffer_unordered(PARALLEL_PARTS)
        .collect()
        .await;
    let mut stored = Vec::new();
    let mut failed = None;
    for outcome in outcomes {
        match outcome {
            Ok(Appended::Stored(tenants)) => stored.extend(tenants),
            Ok(Appended::Duplicate) => {}
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
    }
    match failed {
        Some(err) => Err(err),
        None if stored.is_empty() => Ok(Appended::Duplicate),
        None => {
            stored.sort_unstable();
            Ok(Appended::Stored(stored))
        }
    }
}

/// Stores one part (or a whole batch) atomically: all its entries, or none.
///
/// One transaction, two statements whatever the number of tenants: claim the part's id
/// (unless `whole`, the id of the batch it came from, is claimed already) and lock every
/// tenant's chain head (created when new) in tenant-id order, so concurrent requests and
/// replicas append one after another without forks, gaps or deadlocks; then, after
/// chaining and signing the entries here, insert them, move the heads and touch the
/// agents' `last_seen_at`.
/// Entries are signed with the active key of `keys` (unsigned when it has none).
async fn append_part(
    pool: &PgPool,
    batch: ValidBatch,
    whole: Uuid,
    keys: &HmacKeyring,
) -> Result<Appended, StoreError> {
    let tenant_ids: Vec<Uuid> = batch.tenants.iter().map(|(tenant, _)| *tenant).collect();
    let mut tx = crate::storage::begin(pool).await?;
    // Both inserts always run; on a duplicate batch id `fresh` is empty and so is the
    // result. `DO UPDATE` (a no-op) locks an existing head like `SELECT … FOR UPDATE` and
    // returns its latest committed values.
    let heads: Vec<(Uuid, i64, String)> = sqlx::query_as(
        "WITH fresh AS (
            INSERT INTO audit_batches (batch_id, entry_count)
            SELECT $1, $2
            WHERE $5 = $1 OR NOT EXISTS (SELECT 1 FROM audit_batches WHERE batch_id = $5)
            ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id)
         INSERT INTO audit_chain_heads (tenant_id, sequence_number, current_hash)
         SELECT t, 0, $4 FROM fresh, unnest($3::uuid[]) AS t ORDER BY t
         ON CONFLICT (tenant_id) DO UPDATE SET sequence_number = audit_chain_heads.sequence_number
         RETURNING tenant_id, sequence_number, current_hash",
    )
    .bind(batch.batch_id)
    .bind(i32::try_from(batch.entry_count).unwrap_or(i32::MAX))
    .bind(&tenant_ids)
    .bind(hex::encode(chain::GENESIS))
    .bind(whole)
    .fetch_all(&mut *tx)
    .await?;
    if heads.is_empty() {
        tx.rollback().await?;
        return Ok(Appended::Duplicate);
    }
    if heads.len() != tenant_ids.len() {
        return Err(protocol(format!(
            "locked {} chain heads for a batch of {} tenants",
            heads.len(),
            tenant_ids.len()
        )));
    }
    // Chain and sign in batch order (tenant by tenant). The hex forms of the links and
    // MACs go into one buffer, borrowed by the insert's columns below.
    let n = batch.entry_count;
    let mut sequences = Vec::with_capacity(n);
    let mut hexes = String::with_capacity(n * 3 * 64);
    let mut key_id = None;
    let mut new_heads = (Vec::new(), Vec::new(), Vec::new());
    let mut scratch = Vec::with_capacity(512);
    for (tenant, entries) in &batch.tenants {
        let (head_seq, head_hash) = heads
            .iter()
            .find(|(t, _, _)| t == tenant)
            .map(|(_, seq, hash)| (*seq, hash.as_str()))
            .ok_or_else(|| protocol(format!("no chain head locked for tenant {tenant}")))?;
        // A corrupt head must stop ingest for this tenant, not silently restart the chain.
        let mut previous = chain::parse_hash(head_hash).ok_or_else(|| {
            protocol(format!("audit chain head of tenant {tenant} is not a hash"))
        })?;
        let mut sequence = head_seq;
        for entry in entries {
            sequence += 1;
            let fields = EntryFields {
                sequence_number: sequence,
                ..entry.fields()
            };
            let current = fields.link(&previous, &mut scratch);
            let signature = keys.sign_raw(&current);
            push_hex(&mut hexes, &previous);
            push_hex(&mut hexes, &current);
            push_hex(
                &mut hexes,
                signature.as_ref().map_or(&[0; 32], |(_, mac)| mac),
            );
            key_id = signature.map(|(id, _)| id);
            sequences.push(sequence);
            previous = current;
        }
        new_heads.0.push(*tenant);
        new_heads.1.push(sequence);
        new_heads.2.push(hex::encode(previous));
    }
    insert_entries(&mut tx, &batch, &sequences, &hexes, key_id, &new_heads).await?;
    tx.commit().await?;
    Ok(Appended::Stored(
        batch
            .tenants
            .iter()
            .map(|(tenant, entries)| (*tenant, entries.len()))
            .collect(),
    ))
}

fn protocol(message: String) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(message))
}

fn push_hex(out: &mut String, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// One statement: a multi-row insert through `UNNEST` of column arrays, the entries in
/// batch order (as chained), which also moves the chain heads and touches the agents'
/// `last_seen_at`. The text columns borrow from the batch and from `hexes` (previous hash,
/// current hash and MAC of each entry, 64 hex digits each): nothing is copied per entry.
async fn insert_entries(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    batch: &ValidBatch,
    sequences: &[i64],
    hexes: &str,
    key_id: Option<&str>,
    (tenants, head_sequences, head_hashes): &(Vec<Uuid>, Vec<i64>, Vec<String>),
) -> Result<(), StoreError> {
    let all = || batch.tenants.iter().flat_map(|(_, entries)| entries.iter());
    let text = |f: fn(&ChainEntry) -> &str| all().map(f).collect::<Vec<&str>>();
    let hex = |k: usize| {
        (0..sequences.len())
            .map(|i| {
                hexes
                    .get((3 * i + k) * 64..(3 * i + k + 1) * 64)
                    .unwrap_or("")
            })
            .collect::<Vec<&str>>()
    };
    sqlx::query(
        "WITH heads AS (
            UPDATE audit_chain_heads h SET sequence_number = x.s, current_hash = x.h
            FROM unnest($22::uuid[], $23::bigint[], $24::text[]) AS x(t, s, h)
            WHERE h.tenant_id = x.t),
         seen AS (UPDATE agents SET last_seen_at = now() WHERE id = ANY($25))
         INSERT INTO audit_entries (tenant_id, sequence_number, entry_id, timestamp_ns, ts, kind,
            agent_id, agent_fingerprint, agent_subject, domain, method, path, user_agent,
            source_ip, decision, reason, policy_id, config_version, previous_hash, current_hash,
            signature_key_id, signature)
         SELECT t, s, e, n, to_timestamp(n / 1e9), k, a, fp, sub, d, m, p, ua, ip, dec, r, pol, cv, ph, ch,
            $21, sg
         FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::bigint[], $5::text[], $6::uuid[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
            $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[],
            $20::text[])
            AS x(t, s, e, n, k, a, fp, sub, d, m, p, ua, ip, dec, r, pol, cv, ph, ch, sg)",
    )
    .bind(all().map(|e| e.tenant_id).collect::<Vec<_>>())
    .bind(sequences)
    .bind(all().map(|e| e.entry_id).collect::<Vec<_>>())
    .bind(all().map(|e| e.timestamp_ns).collect::<Vec<_>>())
    .bind(text(|e| &e.kind))
    .bind(all().map(|e| e.agent_id).collect::<Vec<_>>())
    .bind(text(|e| &e.agent_fingerprint))
    .bind(text(|e| &e.agent_subject))
    .bind(text(|e| &e.domain))
    .bind(text(|e| &e.method))
    .bind(text(|e| &e.path))
    .bind(text(|e| &e.user_agent))
    .bind(text(|e| &e.source_ip))
    .bind(text(|e| &e.decision))
    .bind(text(|e| &e.reason))
    .bind(all().map(|e| e.policy_id.as_deref()).collect::<Vec<_>>())
    .bind(text(|e| &e.config_version))
    .bind(hex(0))
    .bind(hex(1))
    .bind(
        hex(2)
            .into_iter()
            .map(|mac| key_id.map(|_| mac))
            .collect::<Vec<Option<&str>>>(),
    )
    .bind(key_id)
    .bind(tenants)
    .bind(head_sequences)
    .bind(head_hashes)
    .bind(&batch.agent_ids)
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
    signature_key_id: Option<String>,
    signature: Option<String>,
}

impl From<Row> for StoredEntry {
    fn from(r: Row) -> Self {
        let signature = match (r.signature_key_id, r.signature) {
            (Some(key_id), Some(mac)) => Some(EntrySignature { key_id, mac }),
            _ => None,
        };
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
            signature,
        }
    }
}

/// The columns of [`Row`].
const ENTRY_COLUMNS: &str = "e.tenant_id, e.sequence_number, e.entry_id, e.timestamp_ns, e.kind,
    e.agent_id, e.agent_fingerprint, e.agent_subject, e.domain, e.method, e.path, e.user_agent,
    e.source_ip, e.decision, e.reason, e.policy_id, e.config_version, e.previous_hash,
    e.current_hash, e.signature_key_id, e.signature";

/// An entry joined with the checkpoint taken at it, if any.
#[derive(sqlx::FromRow)]
struct RecordRow {
    #[sqlx(flatten)]
    entry: Row,
    cp_head_hash: Option<String>,
    cp_created_at_ns: Option<i64>,
    cp_key_id: Option<String>,
    cp_signature: Option<String>,
}

impl From<RecordRow> for ExportRecord {
    fn from(r: RecordRow) -> Self {
        let (tenant_id, sequence_number) = (r.entry.tenant_id, r.entry.sequence_number);
        let checkpoint = match (
            r.cp_head_hash,
            r.cp_created_at_ns,
            r.cp_key_id,
            r.cp_signature,
        ) {
            (Some(head_hash), Some(created_at_ns), Some(key_id), Some(signature)) => {
                Some(Checkpoint {
                    tenant_id,
                    sequence_number,
                    head_hash,
                    created_at_ns,
                    key_id,
                    signature,
                })
            }
            _ => None,
        };
        ExportRecord::new(r.entry.into(), checkpoint)
    }
}

fn record_query(filter: &str) -> String {
    format!(
        "SELECT {ENTRY_COLUMNS}, c.head_hash AS cp_head_hash, c.created_at_ns AS cp_created_at_ns,
                c.key_id AS cp_key_id, c.signature AS cp_signature
         FROM audit_entries e
         LEFT JOIN audit_checkpoints c
           ON c.tenant_id = e.tenant_id AND c.sequence_number = e.sequence_number
         WHERE {filter} ORDER BY e.sequence_number"
    )
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

/// Streams a tenant's entries from `from_sequence` on, in sequence order, into `visit`
/// (constant memory).
pub async fn for_each_entry(
    pool: &PgPool,
    tenant: Uuid,
    from_sequence: i64,
    mut visit: impl FnMut(StoredEntry),
) -> Result<(), StoreError> {
    let query = format!(
        "SELECT {ENTRY_COLUMNS} FROM audit_entries e
         WHERE e.tenant_id = $1 AND e.sequence_number >= $2
         ORDER BY e.sequence_number"
    );
    let mut rows = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(query))
        .bind(tenant)
        .bind(from_sequence)
        .fetch(pool);
    while let Some(row) = rows.try_next().await? {
        visit(row.into());
    }
    Ok(())
}

/// Filters of the entries listing; all optional but the tenant.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub tenant_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub domain: Option<String>,
    pub decision: Option<String>,
    pub policy_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Only entries after this sequence number (the cursor).
    pub after_sequence: i64,
}

/// One page of entries in sequence order; `limit + 1` rows are read to know whether more
/// follow.
pub async fn list_entries(
    pool: &PgPool,
    filter: &EntryFilter,
    limit: i64,
) -> Result<(Vec<ExportRecord>, bool), StoreError> {
    let query = record_query(
        "e.tenant_id = $1 AND e.sequence_number > $2
         AND ($3::uuid IS NULL OR e.agent_id = $3)
         AND ($4::text IS NULL OR e.domain = $4)
         AND ($5::text IS NULL OR e.decision = $5)
         AND ($6::text IS NULL OR e.policy_id = $6)
         AND ($7::timestamptz IS NULL OR e.ts >= $7)
         AND ($8::timestamptz IS NULL OR e.ts < $8)",
    ) + " LIMIT $9";
    let mut rows: Vec<ExportRecord> = sqlx::query_as::<_, RecordRow>(sqlx::AssertSqlSafe(query))
        .bind(filter.tenant_id)
        .bind(filter.after_sequence)
        .bind(filter.agent_id)
        .bind(filter.domain.as_deref())
        .bind(filter.decision.as_deref())
        .bind(filter.policy_id.as_deref())
        .bind(filter.from)
        .bind(filter.to)
        .bind(limit + 1)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(ExportRecord::from)
        .collect();
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    Ok((rows, more))
}

/// Streams a tenant's whole chain (one statement, so one consistent snapshot) into `out`,
/// row by row: memory stays flat whatever the size. Stops early, without error, when the
/// receiver goes away (the client disconnected). Returns how many records were sent and
/// whether that was all of them.
pub async fn export(
    pool: &PgPool,
    tenant: Uuid,
    out: tokio::sync::mpsc::Sender<ExportRecord>,
) -> Result<(u64, bool), StoreError> {
    let query = record_query("e.tenant_id = $1");
    let mut rows = sqlx::query_as::<_, RecordRow>(sqlx::AssertSqlSafe(query))
        .bind(tenant)
        .fetch(pool);
    let mut sent = 0;
    while let Some(row) = rows.try_next().await? {
        if out.send(row.into()).await.is_err() {
            return Ok((sent, false));
        }
        sent += 1;
    }
    Ok((sent, true))
}

/// A tenant's chain head (sequence, hash), if it has one.
pub async fn chain_head(pool: &PgPool, tenant: Uuid) -> Result<Option<(i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT sequence_number, current_hash FROM audit_chain_heads WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_optional(pool)
    .await?)
}

/// Tenants whose chain head moved past their latest checkpoint.
pub async fn heads_without_checkpoint(pool: &PgPool) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT h.tenant_id FROM audit_chain_heads h
         WHERE h.sequence_number > COALESCE(
            (SELECT max(c.sequence_number) FROM audit_checkpoints c WHERE c.tenant_id = h.tenant_id), 0)
         ORDER BY h.tenant_id",
    )
    .fetch_all(pool)
    .await?)
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    tenant_id: Uuid,
    sequence_number: i64,
    head_hash: String,
    created_at_ns: i64,
    key_id: String,
    signature: String,
}

impl From<CheckpointRow> for Checkpoint {
    fn from(r: CheckpointRow) -> Self {
        Checkpoint {
            tenant_id: r.tenant_id,
            sequence_number: r.sequence_number,
            head_hash: r.head_hash,
            created_at_ns: r.created_at_ns,
            key_id: r.key_id,
            signature: r.signature,
        }
    }
}

/// Stores a checkpoint; when this head was checkpointed already (another replica, a
/// repeated request) the stored one is returned instead.
pub async fn insert_checkpoint(pool: &PgPool, cp: &Checkpoint) -> Result<Checkpoint, StoreError> {
    let mut tx = crate::storage::begin(pool).await?;
    let stored = store_checkpoint(&mut tx, cp).await?;
    tx.commit().await?;
    Ok(stored)
}

/// [`insert_checkpoint`] on a connection the caller holds (inside its transaction).
pub async fn store_checkpoint(
    conn: &mut sqlx::PgConnection,
    cp: &Checkpoint,
) -> Result<Checkpoint, StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints
            (tenant_id, sequence_number, head_hash, created_at_ns, key_id, signature)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, sequence_number) DO NOTHING",
    )
    .bind(cp.tenant_id)
    .bind(cp.sequence_number)
    .bind(&cp.head_hash)
    .bind(cp.created_at_ns)
    .bind(&cp.key_id)
    .bind(&cp.signature)
    .execute(&mut *conn)
    .await?;
    let stored: CheckpointRow = sqlx::query_as(
        "SELECT tenant_id, sequence_number, head_hash, created_at_ns, key_id, signature
         FROM audit_checkpoints WHERE tenant_id = $1 AND sequence_number = $2",
    )
    .bind(cp.tenant_id)
    .bind(cp.sequence_number)
    .fetch_one(&mut *conn)
    .await?;
    Ok(stored.into())
}

/// A tenant's checkpoints in sequence order.
pub async fn checkpoints(pool: &PgPool, tenant: Uuid) -> Result<Vec<Checkpoint>, StoreError> {
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT tenant_id, sequence_number, head_hash, created_at_ns, key_id, signature
         FROM audit_checkpoints WHERE tenant_id = $1 ORDER BY sequence_number",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Checkpoint::from).collect())
}
