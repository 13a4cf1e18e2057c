//! Temporal analytics over the audit entries: decision counts in time buckets
//! (`time_bucket` on a TimescaleDB hypertable, `date_bin` on plain PostgreSQL; same
//! buckets), top denied domains, an hour-of-day × day-of-week heatmap. Times are UTC.

use crate::storage::StoreError;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// What the bucketed counts are split by, besides time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Outcome,
    Agent,
    Domain,
}

/// Decisions in one time bucket (and group).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Bucket {
    pub bucket: DateTime<Utc>,
    /// The agent id or domain for `agent`/`domain` grouping; absent for `outcome`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub allowed: i64,
    pub denied: i64,
}

/// The time window and tenant every analytics query covers.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub tenant_id: Uuid,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The bucketing function for this database: TimescaleDB's `time_bucket` when
/// `audit_entries` is a hypertable (it knows the chunks), PostgreSQL's `date_bin` otherwise.
/// Both take (width, ts, origin) and give the same buckets.
pub async fn bucket_function(pool: &PgPool) -> Result<&'static str, StoreError> {
    Ok(match super::retention::layout(pool).await? {
        super::retention::Layout::Hypertable => "time_bucket",
        _ => "date_bin",
    })
}

/// Counts per `bucket_secs` bucket (aligned to 2000-01-01T00:00:00Z), split by outcome and
/// optionally by agent or domain.
pub async fn decisions(
    pool: &PgPool,
    window: Window,
    bucket_secs: i64,
    group_by: GroupBy,
) -> Result<Vec<Bucket>, StoreError> {
    let key = match group_by {
        GroupBy::Outcome => "NULL::text",
        GroupBy::Agent => "COALESCE(agent_id::text, '')",
        GroupBy::Domain => "domain",
    };
    let bucket = bucket_function(pool).await?;
    let query = format!(
        "SELECT {bucket}(make_interval(secs => $4), ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                {key} AS key,
                count(*) FILTER (WHERE decision = 'allow') AS allowed,
                count(*) FILTER (WHERE decision = 'deny') AS denied
         FROM audit_entries
         WHERE tenant_id = $1 AND kind = 'decision' AND ts >= $2 AND ts < $3
         GROUP BY 1, 2 ORDER BY 1, 2"
    );
    Ok(sqlx::query_as::<_, Bucket>(sqlx::AssertSqlSafe(query))
        .bind(window.tenant_id)
        .bind(window.from)
        .bind(window.to)
        .bind(bucket_secs as f64)
        .fetch_all(pool)
        .await?)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct DomainCount {
    pub domain: String,
    pub denied: i64,
}

/// The most denied domains, most first (ties by name).
pub async fn top_denied_domains(
    pool: &PgPool,
    window: Window,
    limit: i64,
) -> Result<Vec<DomainCount>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT domain, count(*) AS denied FROM audit_entries
         WHERE tenant_id = $1 AND kind = 'decision' AND ts >= $2 AND ts < $3 AND decision = 'deny'
         GROUP BY domain ORDER BY denied DESC, domain LIMIT $4",
    )
    .bind(window.tenant_id)
    .bind(window.from)
    .bind(window.to)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct HeatCell {
    /// ISO day of week, 1 = Monday … 7 = Sunday (UTC).
    pub day_of_week: i32,
    /// 0–23 (UTC).
    pub hour: i32,
    pub allowed: i64,
    pub denied: i64,
}

/// Decisions by hour of day × day of week; empty cells are left out.
pub async fn heatmap(pool: &PgPool, window: Window) -> Result<Vec<HeatCell>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT extract(isodow FROM ts AT TIME ZONE 'UTC')::int AS day_of_week,
                extract(hour FROM ts AT TIME ZONE 'UTC')::int AS hour,
                count(*) FILTER (WHERE decision = 'allow') AS allowed,
                count(*) FILTER (WHERE decision = 'deny') AS denied
         FROM audit_entries
         WHERE tenant_id = $1 AND kind = 'decision' AND ts >= $2 AND ts < $3
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(window.tenant_id)
    .bind(window.from)
    .bind(window.to)
    .fetch_all(pool)
    .await?)
}
