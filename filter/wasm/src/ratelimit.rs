//! Rate limits held in proxy-wasm shared data, so one limit spans every worker thread.

use crate::host;
use filter_core::decision::RateLimit;
use filter_core::ratelimit::{Acquire, BucketState, acquire};

/// Attempts before giving up on a contended key.
const CAS_ATTEMPTS: usize = 16;

/// The outcome of a check: allowed, limited (with Retry-After seconds), or the store
/// failed (the request is allowed and the failure counted).
pub enum Check {
    Allowed,
    Limited(u64),
    StoreError,
}

/// Takes one token for `agent` under `policy` with compare-and-swap on shared data.
pub fn check(agent: &str, policy: &str, limit: &RateLimit, now_ns: u64) -> Check {
    let key = format!("chronoguard.rl.{agent}.{policy}");
    for _ in 0..CAS_ATTEMPTS {
        let Ok((bytes, cas)) = host::shared_get(&key) else {
            return Check::StoreError;
        };
        let state = bytes.as_deref().and_then(BucketState::decode);
        match acquire(limit, state, now_ns) {
            Acquire::Limited { retry_after_s } => return Check::Limited(retry_after_s),
            Acquire::Allowed(next) => match host::shared_set(&key, &next.encode(), cas) {
                Ok(true) => return Check::Allowed,
                Ok(false) => continue,
                Err(()) => return Check::StoreError,
            },
        }
    }
    Check::StoreError
}
