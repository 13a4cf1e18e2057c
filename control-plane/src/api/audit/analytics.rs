//! Temporal analytics for auditors: bucketed decision counts, top denied domains and an
//! hour-of-day × day-of-week heatmap, per tenant and time window (UTC).

use super::super::ApiError;
use super::super::auth::AuditReader;
use super::Params;
use crate::app::AppState;
use crate::storage::audit::analytics::{
    self as store, Bucket, DomainCount, GroupBy, HeatCell, Window,
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most buckets one request may produce.
const MAX_BUCKETS: i64 = 10_000;

/// Every analytics query: a tenant and a window, `from` inclusive (default 24 hours
/// before `to`), `to` exclusive (default now), both RFC 3339.
#[derive(Deserialize)]
pub struct WindowQuery {
    tenant_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

fn window(
    tenant_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Window, ApiError> {
    let to = to.unwrap_or_else(Utc::now);
    let from = from.unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(ApiError::field("to", "must be after from"));
    }
    Ok(Window {
        tenant_id,
        from,
        to,
    })
}

#[derive(Deserialize)]
pub struct DecisionsQuery {
    tenant_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    /// Bucket width: a number with unit `s`, `m`, `h` or `d` (e.g. `15m`); default `1h`.
    bucket: Option<String>,
    group_by: Option<GroupBy>,
}

#[derive(Serialize)]
pub struct DecisionsReport {
    tenant_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket_secs: i64,
    buckets: Vec<Bucket>,
}

/// Parses `30s`, `15m`, `1h`, `7d` into seconds.
fn bucket_secs(spec: &str) -> Option<i64> {
    let (number, unit) = spec.split_at(spec.len().checked_sub(1)?);
    let n: i64 = number.parse().ok().filter(|n| *n > 0)?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// `GET /api/v1/analytics/decisions?tenant_id=…&bucket=1h&group_by=outcome|agent|domain`
pub async fn decisions(
    _: AuditReader,
    axum::extract::State(state): axum::extract::State<AppState>,
    Params(q): Params<DecisionsQuery>,
) -> Result<axum::Json<DecisionsReport>, ApiError> {
    let window = window(q.tenant_id, q.from, q.to)?;
    let secs = match q.bucket.as_deref() {
        None => 3600,
        Some(spec) => bucket_secs(spec)
            .ok_or_else(|| ApiError::field("bucket", "must look like 30s, 15m, 1h or 1d"))?,
    };
    let span = (window.to - window.from).num_seconds();
    if span / secs > MAX_BUCKETS {
        return Err(ApiError::field(
            "bucket",
            format!("the window would have more than {MAX_BUCKETS} buckets"),
        ));
    }
    let buckets = store::decisions(
        &state.store.pool,
        window,
        secs,
        q.group_by.unwrap_or(GroupBy::Outcome),
    )
    .await?;
    Ok(axum::Json(DecisionsReport {
        tenant_id: window.tenant_id,
        from: window.from,
        to: window.to,
        bucket_secs: secs,
        buckets,
    }))
}

#[derive(Deserialize)]
pub struct TopQuery {
    tenant_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

#[derive(Serialize)]
pub struct TopDenied {
    tenant_id: Uuid,
    domains: Vec<DomainCount>,
}

/// `GET /api/v1/analytics/top-denied-domains?tenant_id=…&limit=10`
pub async fn top_denied_domains(
    _: AuditReader,
    axum::extract::State(state): axum::extract::State<AppState>,
    Params(q): Params<TopQuery>,
) -> Result<axum::Json<TopDenied>, ApiError> {
    let window = window(q.tenant_id, q.from, q.to)?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 1000"));
    }
    let domains = store::top_denied_domains(&state.store.pool, window, limit).await?;
    Ok(axum::Json(TopDenied {
        tenant_id: window.tenant_id,
        domains,
    }))
}

#[derive(Serialize)]
pub struct Heatmap {
    tenant_id: Uuid,
    cells: Vec<HeatCell>,
}

/// `GET /api/v1/analytics/heatmap?tenant_id=…`: hour of day × ISO day of week (UTC).
pub async fn heatmap(
    _: AuditReader,
    axum::extract::State(state): axum::extract::State<AppState>,
    Params(q): Params<WindowQuery>,
) -> Result<axum::Json<Heatmap>, ApiError> {
    let window = window(q.tenant_id, q.from, q.to)?;
    let cells = store::heatmap(&state.store.pool, window).await?;
    Ok(axum::Json(Heatmap {
        tenant_id: window.tenant_id,
        cells,
    }))
}

#[cfg(test)]
mod tests {
    use super::bucket_secs;

    #[test]
    fn bucket_specs() {
        assert_eq!(bucket_secs("30s"), Some(30));
        assert_eq!(bucket_secs("15m"), Some(900));
        assert_eq!(bucket_secs("1h"), Some(3600));
        assert_eq!(bucket_secs("7d"), Some(604_800));
        for bad in ["", "h", "0h", "-1h", "1w", "1.5h", "99999999999999999d"] {
            assert_eq!(bucket_secs(bad), None, "{bad}");
        }
    }
}
