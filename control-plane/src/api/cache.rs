//! Redis for the REST API: a read-through cache of single agents and policies, and the
//! circuit breaker every Redis use of the API goes through.
//!
//! Entries carry the resource version and are written by one Lua script that never
//! replaces a newer version with an older one, so a slow read cannot put back what a
//! write just replaced; writes store the new version (write-through), deletes a version
//! floor. Entries live `TTL_MS` (fields the API does not write, such as `last_seen_at`,
//! may be that old). Every write path reads the database, never the cache.
//!
//! Redis is optional: without it, or while the breaker is open after a failure, reads go
//! to the database and the rate limiter applies its fail-open/closed setting.

use crate::app::AppState;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicI64, Ordering};
use uuid::Uuid;

/// How long an entry lives.
const TTL_MS: i64 = 10_000;
/// How long Redis is left alone after a failure.
const BREAK_MS: i64 = 5_000;

static OPEN_UNTIL_MS: AtomicI64 = AtomicI64::new(0);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A Redis connection, unless Redis is not configured or the breaker is open.
pub fn connection(state: &AppState) -> Option<redis::aio::ConnectionManager> {
    if now_ms() < OPEN_UNTIL_MS.load(Ordering::Relaxed) {
        return None;
    }
    state.store.redis.clone()
}

/// Records a failed Redis call: the breaker opens for `BREAK_MS`.
pub fn failed(error: &redis::RedisError) {
    let until = now_ms() + BREAK_MS;
    if OPEN_UNTIL_MS.swap(until, Ordering::Relaxed) < now_ms() {
        tracing::warn!(%error, "redis call failed; bypassing redis for {BREAK_MS} ms");
    }
}

/// Stores `body` at `version` unless a newer version is cached; an empty body is a
/// version floor (a deleted resource, or one whose row changed without a body at hand).
const SET: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'body', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

fn key(kind: &str, id: Uuid) -> String {
    format!("chronoguard:cache:v1:{kind}:{}", id.simple())
}

/// The cached resource, if any.
pub async fn get<T: DeserializeOwned>(state: &AppState, kind: &str, id: Uuid) -> Option<T> {
    let mut conn = connection(state)?;
    let body: Option<String> = match redis::cmd("HGET")
        .arg(key(kind, id))
        .arg("body")
        .query_async(&mut conn)
        .await
    {
        Ok(body) => body,
        Err(error) => {
            failed(&error);
            return None;
        }
    };
    body.filter(|b| !b.is_empty())
        .and_then(|b| serde_json::from_str(&b).ok())
}

/// Caches `value` at `version` (see the module docs for the ordering rule).
pub async fn put<T: Serialize>(state: &AppState, kind: &str, id: Uuid, version: i64, value: &T) {
    let body = serde_json::to_string(value).unwrap_or_default();
    set(state, kind, id, version, &body).await;
}

/// Makes every cached version of the resource below `version` unusable.
pub async fn floor(state: &AppState, kind: &str, id: Uuid, version: i64) {
    set(state, kind, id, version, "").await;
}

async fn set(state: &AppState, kind: &str, id: Uuid, version: i64, body: &str) {
    let Some(mut conn) = connection(state) else {
        return;
    };
    let stored: Result<i64, _> = redis::cmd("EVAL")
        .arg(SET)
        .arg(1)
        .arg(key(kind, id))
        .arg(version)
        .arg(body)
        .arg(TTL_MS)
        .query_async(&mut conn)
        .await;
    if let Err(error) = stored {
        failed(&error);
    }
}
