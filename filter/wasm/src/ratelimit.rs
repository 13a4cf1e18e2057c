//! Rate limits held in proxy-wasm shared data, so one limit spans every worker thread.
//!
//! Each worker leases tokens from the shared bucket (`filter_core::ratelimit::Leases`):
//! with large limits most requests spend a local token and touch no shared data.

use crate::host;
use filter_core::decision::RateLimit;
use filter_core::ratelimit::{Acquire, BucketState, Leases, acquire, lease_size};
use std::cell::RefCell;

/// Attempts before giving up on a contended key.
const CAS_ATTEMPTS: usize = 16;

/// The value of a bucket created but not used yet (any value that is not a state).
const NEW_BUCKET: u8 = 0;

thread_local! {
    /// This worker VM's leases.
    static LEASES: RefCell<Leases> = RefCell::new(Leases::default());
    /// The shared-data key of the request being checked, written into one buffer (no
    /// allocation per request when a lease answers).
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The outcome of a check: allowed, limited (with Retry-After seconds), or the store
/// failed (the request is allowed and the failure counted).
pub enum Check {
    Allowed,
    Limited(u64),
    StoreError,
}

/// Drops this worker's leases (a new configuration may carry other limits).
pub fn reset() {
    LEASES.with(|l| l.borrow_mut().clear());
}

/// Takes one token for `agent` under `policy`: from this worker's lease, else from the
/// shared bucket with compare-and-swap (leasing more when the limit is large).
pub fn check(agent: &str, policy: &str, limit: &RateLimit, now_ns: u64) -> Check {
    KEY.with(|key| {
        let mut key = key.borrow_mut();
        key.clear();
        key.push_str("chronoguard.rl.");
        key.push_str(agent);
        key.push('.');
        key.push_str(policy);
        check_key(&key, limit, now_ns)
    })
}

fn check_key(key: &str, limit: &RateLimit, now_ns: u64) -> Check {
    if LEASES.with(|l| l.borrow_mut().take(key, now_ns)) {
        return Check::Allowed;
    }
    let want = lease_size(limit);
    for _ in 0..CAS_ATTEMPTS {
        let Ok((bytes, cas)) = host::shared_get(key) else {
            return Check::StoreError;
        };
        let Some(bytes) = bytes else {
            // No worker has used this bucket yet. The host has no create-if-absent, and a
            // write without a CAS token replaces whatever is there: two workers taking
            // the first tokens that way at once would both succeed and one token would
            // be lost (one request over the limit). So the bucket is first created
            // empty, and every token is then taken with compare-and-swap. Two workers
            // creating it at once write the same empty value; only one paused between
            // its read and this write, while another read, wrote and took a token,
            // could still erase that token.
            if host::shared_set(key, &[NEW_BUCKET], None).is_err() {
                return Check::StoreError;
            }
            continue;
        };
        // A new bucket's placeholder decodes as no state: full.
        let state = BucketState::decode(&bytes);
        match acquire(limit, state, now_ns, want) {
            Acquire::Limited { retry_after_s } => return Check::Limited(retry_after_s),
            Acquire::Allowed { state, granted } => {
                match host::shared_set(key, &state.encode(), cas) {
                    Ok(true) => {
                        LEASES.with(|l| l.borrow_mut().granted(key, granted, now_ns));
                        return Check::Allowed;
                    }
                    Ok(false) => continue,
                    Err(()) => return Check::StoreError,
                }
            }
        }
    }
    Check::StoreError
}
