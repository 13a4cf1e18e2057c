//! Per-credential rate limiting of the admin API: a token bucket per bearer token in
//! Redis, refilled continuously, updated atomically by one Lua script so replicas share
//! it. Over the limit → 429 with `Retry-After`. Without Redis the limiter fails open or
//! closed as configured (`auth.rate_limit.fail_open`).
//!
//! The bucket key is a hash of the token, never the token. Health, metrics, the OpenAPI
//! document and the filter's audit ingest are not limited (the filter has its own
//! backpressure: it keeps batches until they are acknowledged).

use super::ApiError;
use crate::app::AppState;
use crate::config::RateLimit;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Refills, takes one token if there is one, and answers `{allowed, ms_until_next}`.
/// Time comes from Redis, so replica clocks do not matter.
const SCRIPT: &str = r"
local burst = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * per_ms)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_ms) + 1000)
return {allowed, wait}
";

/// Middleware over the router.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let settings = &state.settings.auth.rate_limit;
    let path = request.uri().path();
    let exempt = !path.starts_with("/api/v1/")
        || path == "/api/v1/audit/batches"
        || path == "/api/v1/openapi.json";
    if !settings.enabled || exempt {
        return next.run(request).await;
    }
    let Some(token) = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        // Unauthenticated requests are refused by the handlers' extractors anyway.
        return next.run(request).await;
    };
    let key = format!(
        "chronoguard:ratelimit:{}",
        &hex::encode(Sha256::digest(token.as_bytes()))[..32]
    );
    match take(&state, settings, &key).await {
        Ok(None) => next.run(request).await,
        Ok(Some(wait_ms)) => ApiError::TooManyRequests(wait_ms.div_ceil(1_000)).into_response(),
        Err(reason) if settings.fail_open => {
            tracing::debug!(%reason, "rate limiter unavailable; failing open");
            next.run(request).await
        }
        Err(reason) => {
            tracing::warn!(%reason, "rate limiter unavailable; failing closed");
            ApiError::Unavailable.into_response()
        }
    }
}

/// `Ok(None)` when the request may pass, `Ok(Some(ms))` when it must wait.
async fn take(state: &AppState, settings: &RateLimit, key: &str) -> Result<Option<u64>, String> {
    let mut conn = super::cache::connection(state)
        .ok_or_else(|| "redis is not configured or unavailable".to_owned())?;
    let per_ms = f64::from(settings.requests_per_minute.max(1)) / 60_000.0;
    let (allowed, wait): (i64, i64) = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(1)
        .arg(key)
        .arg(settings.burst.max(1))
        .arg(per_ms)
        .query_async(&mut conn)
        .await
        .map_err(|e| {
            super::cache::failed(&e);
            e.to_string()
        })?;
    Ok((allowed != 1).then(|| u64::try_from(wait).unwrap_or(1_000)))
}
