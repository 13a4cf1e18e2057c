//! The SQL of audit storage maintenance: which layout `audit_entries` has (TimescaleDB
//! hypertable or native range partitions), weekly partitions created ahead and filled
//! from the default partition, time ranges past retention, retention anchors, and the
//! drop of one range together with its anchors. The policy (what to verify and sign
//! before a drop) lives in `crate::audit::retention`.
//!
//! Everything here runs on one connection that holds the maintenance advisory lock, so a
//! pool of one (PGlite) never waits on itself.

use super::{CheckpointRow, ENTRY_COLUMNS, Row};
use crate::audit::chain::StoredEntry;
use crate::audit::checkpoint::Checkpoint;
use crate::storage::StoreError;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use futures::TryStreamExt;
use sqlx::{Connection as _, PgConnection, PgPool};
use uuid::Uuid;

/// Session advisory lock key of the maintenance task ("cgaudit" + 1): one replica at a
/// time creates, moves and drops.
pub const MAINTENANCE_LOCK: i64 = 0x0063_6761_7564_6974_i64 + 1;

/// The native layout's weeks start on Monday 00:00 UTC (the migration uses the same
/// origin with `date_bin`).
pub const PARTITION_PREFIX: &str = "audit_entries_p";

/// How `audit_entries` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A TimescaleDB hypertable (7-day chunks, compression, retention policy).
    Hypertable,
    /// Native range partitions on `ts`, maintained by the control plane.
    Partitioned,
    /// A plain table (before the partitioning migration); nothing to maintain.
    Plain,
}

/// One partition or chunk: rows with `start <= ts < end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeRange {
    /// Quoted, schema-qualified when needed: usable in DDL as is.
    pub relation: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// The layout of `audit_entries`.
pub async fn layout(conn: impl sqlx::PgExecutor<'_>) -> Result<Layout, StoreError> {
    let row: Option<(String, bool)> = sqlx::query_as(
        "SELECT c.relkind::text,
                EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
         FROM pg_class c WHERE c.oid = to_regclass('audit_entries')",
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((kind, _)) if kind == "p" => Layout::Partitioned,
        Some((_, true)) => Layout::Hypertable,
        _ => Layout::Plain,
    })
}

/// Takes the maintenance lock for this session; `false` when another session holds it.
pub async fn try_lock(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .fetch_one(conn)
        .await?)
}

pub async fn unlock(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

/// The Monday 00:00 UTC starting the week of `at`.
pub fn week_start(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::Datelike as _;
    let date = at.date_naive();
    let monday = date - Duration::days(i64::from(date.weekday().num_days_from_monday()));
    monday.and_time(chrono::NaiveTime::MIN).and_utc()
}

/// `audit_entries_pYYYYMMDD` for the week starting at `start`.
pub fn partition_name(start: DateTime<Utc>) -> String {
    format!("{PARTITION_PREFIX}{}", start.format("%Y%m%d"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates the week's partition starting at `start` (a Monday) unless it exists, moving
/// the rows of that week out of the default partition into it. Returns `None` when it
/// existed, else how many rows were moved.
pub async fn ensure_week(
    conn: &mut PgConnection,
    start: DateTime<Utc>,
) -> Result<Option<u64>, StoreError> {
    let end = start + Duration::days(7);
    let name = partition_name(start);
    let mut tx = conn.begin().await?;
    // The lock below holds back every reader and writer: give up soon (the caller retries
    // at the next run) rather than stall the API behind a long export.
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        tx.commit().await?;
        return Ok(None);
    }
    let relation = quote_ident(&name);
    // Nothing may touch the table while rows move:
    // - an insert routed to the default partition before the attach would fail afterwards
    //   ("violates partition constraint") or leave a row the attach refuses;
    // - a read that queued behind the move would be planned with the partitions it saw
    //   (not the new one) but read with a snapshot taken after the commit (the rows gone
    //   from the default one): it would miss the moved rows, and verification would call
    //   the chain truncated.
    // ACCESS EXCLUSIVE on the parent waits for the statements in flight and holds new
    // ones back until the commit; they then plan with the new partition.
    sqlx::query("LOCK TABLE audit_entries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // Created detached, filled from the default partition, then attached: attaching
    // checks the default partition holds no row of this week any more.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {relation} (LIKE audit_entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )))
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH moved AS (DELETE FROM audit_entries_default WHERE ts >= $1 AND ts < $2 RETURNING *)
         INSERT INTO {relation} SELECT * FROM moved"
    )))
    .bind(start)
    .bind(end)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_entries ATTACH PARTITION {relation} FOR VALUES FROM ('{}') TO ('{}')",
        start.to_rfc3339(),
        end.to_rfc3339()
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(moved))
}

/// The weeks (Monday starts) of rows in the default partition, oldest first.
pub async fn default_partition_weeks(
    conn: &mut PgConnection,
) -> Result<Vec<DateTime<Utc>>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT date_bin(INTERVAL '7 days', ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')
         FROM audit_entries_default ORDER BY 1 LIMIT 1000",
    )
    .fetch_all(conn)
    .await?)
}

/// Every weekly partition or chunk, oldest first (the default partition is not one).
pub async fn ranges(conn: &mut PgConnection, layout: Layout) -> Result<Vec<TimeRange>, StoreError> {
    match layout {
        Layout::Plain => Ok(Vec::new()),
        Layout::Partitioned => {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = to_regclass('audit_entries')",
            )
            .fetch_all(conn)
            .await?;
            let mut ranges: Vec<TimeRange> = names
                .iter()
                .filter_map(|name| {
                    let date = name.strip_prefix(PARTITION_PREFIX)?;
                    let date = NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
                    let start = date.and_time(chrono::NaiveTime::MIN).and_utc();
                    Some(TimeRange {
                        relation: quote_ident(name),
                        start,
                        end: start + Duration::days(7),
                    })
                })
                .collect();
            ranges.sort_by_key(|r| r.start);
            Ok(ranges)
        }
        Layout::Hypertable => {
            let rows: Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
                "SELECT chunk_schema::text, chunk_name::text, range_start, range_end
                 FROM timescaledb_information.chunks
                 WHERE hypertable_name = 'audit_entries' AND hypertable_schema = current_schema()
                 ORDER BY range_start",
            )
            .fetch_all(conn)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(schema, name, start, end)| TimeRange {
                    relation: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
                    start,
                    end,
                })
                .collect())
        }
    }
}

/// Each chain's last sequence number among the entries with `start <= ts < end`.
pub async fn last_sequences(
    conn: impl sqlx::PgExecutor<'_>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<(Uuid, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, max(sequence_number) FROM audit_entries
         WHERE ts >= $1 AND ts < $2 GROUP BY tenant_id ORDER BY tenant_id",
    )
    .bind(start)
    .bind(end)
    .fetch_all(conn)
    .await?)
}

/// A chain's retention anchor: entries up to this sequence may have been dropped, and the
/// signed checkpoint at it is where verification starts.
pub async fn anchor(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT sequence_number FROM audit_retention_anchors WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_optional(conn)
    .await?)
}

/// A chain's checkpoints up to and including `through`, in sequence order.
pub async fn checkpoints_through(
    conn: &mut PgConnection,
    tenant: Uuid,
    through: i64,
) -> Result<Vec<Checkpoint>, StoreError> {
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT tenant_id, sequence_number, head_hash, created_at_ns, key_id, signature
         FROM audit_checkpoints WHERE tenant_id = $1 AND sequence_number <= $2
         ORDER BY sequence_number",
    )
    .bind(tenant)
    .bind(through)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Checkpoint::from).collect())
}

/// Streams a chain's entries `from <= sequence_number <= through` in order into `visit`.
pub async fn for_each_entry_between(
    conn: &mut PgConnection,
    tenant: Uuid,
    from: i64,
    through: i64,
    mut visit: impl FnMut(StoredEntry),
) -> Result<(), StoreError> {
    let query = format!(
        "SELECT {ENTRY_COLUMNS} FROM audit_entries e
         WHERE e.tenant_id = $1 AND e.sequence_number >= $2 AND e.sequence_number <= $3
         ORDER BY e.sequence_number"
    );
    let mut rows = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(query))
        .bind(tenant)
        .bind(from)
        .bind(through)
        .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        visit(row.into());
    }
    Ok(())
}

/// Drops one partition or chunk and records the chains' new anchors, in one transaction,
/// provided its rows' last sequence numbers are still `expected` (what was verified and
/// checkpointed). Returns `false`, dropping nothing, when an entry arrived meanwhile.
pub async fn drop_range(
    conn: &mut PgConnection,
    layout: Layout,
    range: &TimeRange,
    expected: &[(Uuid, i64)],
) -> Result<bool, StoreError> {
    let mut tx = conn.begin().await?;
    // Waits briefly for readers and writers (a running export holds the parent): while
    // this waits, new queries queue behind it, so give up soon and retry at the next run.
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let lock = match layout {
        // Parent first, like inserts: no lock-order inversion.
        Layout::Partitioned => format!(
            "LOCK TABLE audit_entries, {} IN ACCESS EXCLUSIVE MODE",
            range.relation
        ),
        _ => format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", range.relation),
    };
    sqlx::query(sqlx::AssertSqlSafe(lock))
        .execute(&mut *tx)
        .await?;
    if last_sequences(&mut *tx, range.start, range.end).await? != expected {
        tx.rollback().await?;
        return Ok(false);
    }
    for (tenant, sequence) in expected {
        sqlx::query(
            "INSERT INTO audit_retention_anchors (tenant_id, sequence_number, dropped_before)
             VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id) DO UPDATE
             SET sequence_number = GREATEST(audit_retention_anchors.sequence_number, EXCLUDED.sequence_number),
                 dropped_before = GREATEST(audit_retention_anchors.dropped_before, EXCLUDED.dropped_before),
                 updated_at = now()",
        )
        .bind(tenant)
        .bind(sequence)
        .bind(range.end)
        .execute(&mut *tx)
        .await?;
    }
    match layout {
        Layout::Partitioned => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP TABLE {}",
                range.relation
            )))
            .execute(&mut *tx)
            .await?;
        }
        Layout::Hypertable => {
            // Exactly this chunk: the ones entirely inside [start, end).
            sqlx::query(
                "SELECT drop_chunks('audit_entries', older_than => $2::timestamptz,
                                    newer_than => $1::timestamptz)",
            )
            .bind(range.start)
            .bind(range.end)
            .execute(&mut *tx)
            .await?;
        }
        Layout::Plain => {}
    }
    tx.commit().await?;
    Ok(true)
}

/// The retention anchor of a chain, for verification (see [`anchor`]).
pub async fn retention_anchor(pool: &PgPool, tenant: Uuid) -> Result<Option<i64>, StoreError> {
    anchor(pool, tenant).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weeks_start_on_monday_utc_like_the_migration() {
        // 2026-11-25 is a Wednesday; 2000-01-03 (the migration's origin) a Monday.
        assert_eq!(
            week_start(at("2026-11-25T16:46:39Z")),
            at("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            week_start(at("2026-11-23T00:00:00Z")),
            at("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            week_start(at("2026-11-22T23:59:59Z")),
            at("2026-11-16T00:00:00Z")
        );
        assert_eq!(
            week_start(at("2000-01-03T12:00:00Z")),
            at("2000-01-03T00:00:00Z")
        );
        assert_eq!(
            partition_name(at("2026-11-23T00:00:00Z")),
            "audit_entries_p20261123"
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
