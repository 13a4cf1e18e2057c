//! Audit storage maintenance and retention that never breaks verification.
//!
//! A periodic task (and one run at start-up) that, under a database advisory lock (one
//! replica at a time):
//!
//! - native partitioning: creates the weekly partitions of this week and
//!   `audit.partitions_ahead` weeks ahead, and moves rows that landed in the default
//!   partition (a gateway clock far off) into partitions of their own week;
//! - both layouts: drops the weekly partitions / TimescaleDB chunks that ended more than
//!   `audit.retention_days` ago, oldest first. Before a range goes, for every chain with
//!   entries in it, the chain from its current anchor (or sequence 1) through its last
//!   entry in the range (M) must verify (links, HMACs, checkpoints); a signed checkpoint
//!   at M is taken if there is none; then, in one transaction, the range is dropped and
//!   the chain's retention anchor moves to M. A range whose chain does not verify is not
//!   dropped (the evidence stays; `chronoguard_audit_retention_refused_total`).
//!
//! Verification then starts right after the anchor, from the checkpoint at it
//! ([`verify_tenant`]). Entries with a sequence at or below the anchor that sit in a
//! retained range (their timestamp was later than M's) are left alone and not verified.

use super::AuditKeys;
use super::chain::{self, Outcome, Verifier};
use crate::storage::StoreError;
use crate::storage::audit as store;
use crate::storage::audit::retention::{self as sql, Layout, TimeRange};
use chrono::{DateTime, Duration, Utc};
use sqlx::{PgConnection, PgPool};
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// What maintenance is configured to do.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Ranges that ended longer ago than this are dropped; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Weekly partitions created ahead of the current week (native partitioning).
    pub partitions_ahead: u32,
}

impl Policy {
    pub fn from_settings(audit: &crate::config::Audit) -> Self {
        Self {
            retention: (audit.retention_days > 0)
                .then(|| Duration::days(i64::from(audit.retention_days))),
            partitions_ahead: audit.partitions_ahead,
        }
    }
}

/// What one maintenance run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Another session (replica) holds the maintenance lock; nothing was done.
    pub skipped: bool,
    pub partitions_created: u64,
    /// Rows moved out of the default partition.
    pub rows_moved: u64,
    /// Partitions or chunks dropped past retention.
    pub ranges_dropped: u64,
    /// Checkpoints signed to anchor a drop.
    pub anchors_signed: u64,
    /// Ranges not dropped because a chain in them does not verify, or no checkpoint could
    /// be signed.
    pub ranges_refused: u64,
}

/// Counters since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs: AtomicU64,
    pub failures: AtomicU64,
    pub partitions_created: AtomicU64,
    pub rows_moved: AtomicU64,
    pub ranges_dropped: AtomicU64,
    pub anchors_signed: AtomicU64,
    pub ranges_refused: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    runs: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    partitions_created: AtomicU64::new(0),
    rows_moved: AtomicU64::new(0),
    ranges_dropped: AtomicU64::new(0),
    anchors_signed: AtomicU64::new(0),
    ranges_refused: AtomicU64::new(0),
};

impl Counters {
    fn add(&self, report: &Report) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.partitions_created
            .fetch_add(report.partitions_created, Ordering::Relaxed);
        self.rows_moved
            .fetch_add(report.rows_moved, Ordering::Relaxed);
        self.ranges_dropped
            .fetch_add(report.ranges_dropped, Ordering::Relaxed);
        self.anchors_signed
            .fetch_add(report.anchors_signed, Ordering::Relaxed);
        self.ranges_refused
            .fetch_add(report.ranges_refused, Ordering::Relaxed);
    }
}

/// One maintenance run at `now`. Holds one connection (and the advisory lock) throughout.
pub async fn maintain(
    pool: &PgPool,
    keys: &AuditKeys,
    policy: Policy,
    now: DateTime<Utc>,
) -> Result<Report, StoreError> {
    let mut conn = pool.acquire().await?;
    // The advisory lock belongs to this session: the connection is closed afterwards
    // rather than returned to the pool, so no path (an error, a failed unlock, this future
    // being dropped) can leave the lock held by an idle pooled connection, which would
    // keep every other replica's maintenance out.
    conn.close_on_drop();
    if !sql::try_lock(&mut conn).await? {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    }
    let result = maintain_locked(&mut conn, keys, policy, now).await;
    // On error the connection may be unusable; the lock ends with its session anyway.
    let unlocked = sql::unlock(&mut conn).await;
    drop(conn);
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn maintain_locked(
    conn: &mut PgConnection,
    keys: &AuditKeys,
    policy: Policy,
    now: DateTime<Utc>,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let layout = sql::layout(&mut *conn).await?;
    if layout == Layout::Partitioned {
        let this_week = sql::week_start(now);
        let mut weeks: Vec<DateTime<Utc>> = (0..=i64::from(policy.partitions_ahead))
            .map(|i| this_week + Duration::days(7 * i))
            .collect();
        weeks.extend(sql::default_partition_weeks(conn).await?);
        for week in weeks {
            match sql::ensure_week(conn, week).await {
                Ok(Some(moved)) => {
                    report.partitions_created += 1;
                    report.rows_moved += moved;
                    tracing::info!(partition = %sql::partition_name(week), rows_moved = moved,
                        "audit partition created");
                }
                Ok(None) => {}
                Err(err) if is_lock_timeout(&err) => tracing::info!(
                    partition = %sql::partition_name(week),
                    "audit table busy past the lock timeout; partition created next run"),
                Err(err) => return Err(err),
            }
        }
    }
    if let Some(retention) = policy.retention {
        let cutoff = now - retention;
        let expired: Vec<TimeRange> = sql::ranges(conn, layout)
            .await?
            .into_iter()
            .filter(|r| r.end <= cutoff)
            .collect();
        for range in expired {
            match retire(conn, keys, layout, &range, now, &mut report).await? {
                Retired::Dropped => {
                    report.ranges_dropped += 1;
                    tracing::info!(range = %range.relation, start = %range.start,
                        end = %range.end, "audit range dropped past retention");
                }
                Retired::Refused => report.ranges_refused += 1,
                Retired::Busy => tracing::info!(range = %range.relation,
                    "audit range busy or changed while it was being anchored; retried next run"),
            }
        }
    }
    Ok(report)
}

enum Retired {
    Dropped,
    Refused,
    Busy,
}

/// Verifies and anchors every chain with entries in `range`, then drops it.
async fn retire(
    conn: &mut PgConnection,
    keys: &AuditKeys,
    layout: Layout,
    range: &TimeRange,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<Retired, StoreError> {
    let lasts = sql::last_sequences(&mut *conn, range.start, range.end).await?;
    for &(tenant, last) in &lasts {
        let anchor = sql::anchor(&mut *conn, tenant).await?;
        if anchor.is_some_and(|a| a >= last) {
            continue;
        }
        let checkpoints = sql::checkpoints_through(conn, tenant, last).await?;
        let start = match anchor {
            None => Some(Verifier::new()),
            Some(a) => checkpoints
                .iter()
                .find(|cp| cp.sequence_number == a)
                .and_then(|cp| Verifier::after_checkpoint(cp, &keys.trusted)),
        };
        let Some(start) = start else {
            tracing::error!(tenant_id = %tenant, anchor = ?anchor, range = %range.relation,
                "audit retention refused: the checkpoint at the chain's anchor does not verify");
            return Ok(Retired::Refused);
        };
        let mut verifier = start
            .with_keys(keys.hmac.clone())
            .with_checkpoints(&checkpoints, &keys.trusted);
        let from = anchor.map_or(1, |a| a + 1);
        sql::for_each_entry_between(conn, tenant, from, last, |entry| verifier.push(&entry))
            .await?;
        let outcome: Outcome = verifier.finish(Some(last));
        if !outcome.ok || outcome.last_sequence != last {
            tracing::error!(tenant_id = %tenant, range = %range.relation,
                first_bad_sequence = ?outcome.first_bad_sequence, problem = ?outcome.problem,
                "audit retention refused: the chain to be dropped does not verify");
            return Ok(Retired::Refused);
        }
        if checkpoints.iter().any(|cp| cp.sequence_number == last) {
            // Pinned above: its signature verified and it matched the entry.
            continue;
        }
        let Some(signer) = keys.checkpoint_signer.as_ref() else {
            tracing::error!(tenant_id = %tenant, range = %range.relation,
                "audit retention refused: dropping entries needs a signed checkpoint, and audit.checkpoint_signing_key is not set");
            return Ok(Retired::Refused);
        };
        let Some(head) = chain::parse_hash(&outcome.last_hash) else {
            return Ok(Retired::Refused);
        };
        let at_ns = now.timestamp_nanos_opt().unwrap_or(i64::MAX);
        crate::storage::audit::store_checkpoint(conn, &signer.sign(tenant, last, &head, at_ns))
            .await?;
        report.anchors_signed += 1;
    }
    match sql::drop_range(conn, layout, range, &lasts).await {
        Ok(true) => Ok(Retired::Dropped),
        Ok(false) => Ok(Retired::Busy),
        // The range stayed busy past the lock timeout: next run.
        Err(err) if is_lock_timeout(&err) => Ok(Retired::Busy),
        Err(err) => Err(err),
    }
}

/// `lock_not_available`: a `lock_timeout` ran out; the maintenance step is retried.
fn is_lock_timeout(err: &StoreError) -> bool {
    matches!(err, StoreError::Database(sqlx::Error::Database(db))
        if db.code().as_deref() == Some("55P03"))
}

/// Runs maintenance now (start-up) and then every `interval` (`None`: only now), until the
/// process ends. Failures are logged and counted; the next run retries.
pub async fn run(
    pool: PgPool,
    keys: std::sync::Arc<AuditKeys>,
    policy: Policy,
    interval: Option<std::time::Duration>,
) {
    loop {
        match maintain(&pool, &keys, policy, Utc::now()).await {
            Ok(report) => {
                COUNTERS.add(&report);
                if report != Report::default() && !report.skipped {
                    tracing::info!(?report, "audit storage maintenance");
                }
            }
            Err(err) => {
                let failures = COUNTERS.failures.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(error = %err, failures, "audit storage maintenance failed");
            }
        }
        let Some(interval) = interval else {
            return;
        };
        tokio::time::sleep(interval).await;
    }
}

/// The result of verifying a stored chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The first sequence number verified.
    pub from_sequence: i64,
    pub head_sequence: Option<i64>,
    /// The signed checkpoint verification started from (after retention or on request).
    pub anchored_at_checkpoint: Option<i64>,
    pub outcome: Outcome,
}

/// Verifies a tenant's stored chain: from `from_sequence` when given (the signed
/// checkpoint at `from_sequence - 1` must verify, else `Ok(None)`), otherwise from the
/// retention anchor's checkpoint when retention dropped older entries, else from the
/// first entry. Every entry's HMAC is checked with `keys` and the chain is pinned to every
/// stored checkpoint.
pub async fn verify_tenant(
    pool: &PgPool,
    keys: &AuditKeys,
    tenant: Uuid,
    from_sequence: Option<i64>,
) -> Result<Option<Verification>, StoreError> {
    // Head, checkpoints and anchor first: whatever they cover was committed before the
    // entries are read, so concurrent ingest cannot produce a false alarm.
    let head = store::head(pool, tenant).await?;
    let checkpoints = store::checkpoints(pool, tenant).await?;
    let retained_after = match from_sequence {
        Some(_) => None,
        None => store::retention::retention_anchor(pool, tenant).await?,
    };
    let from = from_sequence
        .or(retained_after.map(|a| a + 1))
        .unwrap_or(1)
        .max(1);
    let anchored = (from > 1)
        .then(|| {
            checkpoints
                .iter()
                .find(|cp| cp.sequence_number == from - 1)
                .and_then(|cp| Verifier::after_checkpoint(cp, &keys.trusted))
        })
        .flatten();
    let (start, from, anchored_at) = match anchored {
        Some(verifier) => (verifier, from, Some(from - 1)),
        None if from == 1 => (Verifier::new(), 1, None),
        // A requested start without a valid checkpoint before it.
        None if from_sequence.is_some() => return Ok(None),
        // The retention anchor's checkpoint is gone or does not verify: verify from the
        // start, which reports the missing entries (and a bad checkpoint, if stored).
        None => (Verifier::new(), 1, None),
    };
    let mut verifier = start
        .with_keys(keys.hmac.clone())
        .with_checkpoints(&checkpoints, &keys.trusted);
    store::for_each_entry(pool, tenant, from, |entry| verifier.push(&entry)).await?;
    Ok(Some(Verification {
        from_sequence: from,
        head_sequence: head,
        anchored_at_checkpoint: anchored_at,
        outcome: verifier.finish(head),
    }))
}
