//! Token-bucket arithmetic for per-agent, per-policy rate limits.
//!
//! Pure: the filter keeps the [`BucketState`] in proxy-wasm shared data (one key per
//! agent and policy, updated with compare-and-swap so the limit holds across all worker
//! threads) and calls [`acquire`] with Envoy's clock.
//!
//! Each configured window is a bucket refilled continuously: per minute (capacity
//! `burst`, or `per_minute` without a burst), per hour (capacity `per_hour`) and per day
//! (capacity `per_day`). A request takes one token from every configured bucket, or none
//! if any is empty.
//!
//! Leases: a worker may take up to [`lease_size`] tokens at once and spend them locally
//! for [`LEASE_NS`] without touching shared data ([`Leases`]). Tokens a worker leased but
//! did not use within the lease are lost, never given twice, so the limit still holds
//! across workers; the price is that another worker may be limited while a lease holds
//! tokens (at most `capacity / 64` per worker). Limits under 128 requests lease one token
//! at a time, i.e. every request updates the shared bucket.

use crate::decision::RateLimit;

/// Fixed-point tokens: 1 token = 1_000_000 micro-tokens.
const MICRO: u64 = 1_000_000;

/// Bucket levels and the time they were computed; encoded as 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Micro-tokens in the minute, hour and day buckets.
    pub levels: [u64; 3],
    pub updated_ns: u64,
}

/// The result of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// `granted` tokens (at least one, at most the number asked for) were taken.
    Allowed { state: BucketState, granted: u64 },
    /// Over the limit: seconds until a token is available in every empty bucket.
    Limited { retry_after_s: u64 },
}

// === impl BucketState ===

impl BucketState {
    pub fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, value) in out
            .chunks_exact_mut(8)
            .zip(self.levels.iter().chain(std::iter::once(&self.updated_ns)))
        {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_le_bytes).unwrap_or(0));
        let mut next = || words.next().unwrap_or(0);
        Some(Self {
            levels: [next(), next(), next()],
            updated_ns: next(),
        })
    }
}

/// (capacity, tokens refilled per window) for the minute, hour and day buckets.
fn buckets(limit: &RateLimit) -> [Option<(u64, u64)>; 3] {
    [
        limit
            .per_minute
            .map(|n| (u64::from(limit.burst.unwrap_or(n).max(1)), u64::from(n))),
        limit.per_hour.map(|n| (u64::from(n), u64::from(n))),
        limit.per_day.map(|n| (u64::from(n), u64::from(n))),
    ]
}

const WINDOW_S: [u64; 3] = [60, 3_600, 86_400];

/// Takes one token from every configured bucket if all have one.
pub fn acquire(limit: &RateLimit, state: Option<BucketState>, now_ns: u64, want: u64) -> Acquire {
    let config = buckets(limit);
    let mut levels = [0u64; 3];
    let mut retry_after_s = 0;
    for (i, bucket) in config.iter().enumerate() {
        let Some((capacity, per_window)) = bucket else {
            continue;
        };
        let capacity_micro = capacity * MICRO;
        let level = match state {
            // A new key starts full.
            None => capacity_micro,
            Some(s) => {
                let elapsed_ns = now_ns.saturating_sub(s.updated_ns);
                let window_ns = WINDOW_S.get(i).copied().unwrap_or(60) * 1_000_000_000;
                // Refill rate: per_window tokens per window.
                let refill = (u128::from(elapsed_ns) * u128::from(*per_window) * u128::from(MICRO)
                    / u128::from(window_ns)) as u64;
                s.levels
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_add(refill)
                    .min(capacity_micro)
            }
        };
        if level < MICRO {
            let window_s = WINDOW_S.get(i).copied().unwrap_or(60);
            let missing = MICRO - level;
            // Seconds until one token refills, rounded up.
            let wait = (u128::from(missing) * u128::from(window_s))
                .div_ceil(u128::from(*per_window) * u128::from(MICRO));
            retry_after_s = retry_after_s.max(wait as u64).max(1);
        }
        if let Some(slot) = levels.get_mut(i) {
            *slot = level;
        }
    }
    if retry_after_s > 0 {
        return Acquire::Limited { retry_after_s };
    }
    // Every configured bucket holds at least one token here.
    let granted = config
        .iter()
        .zip(levels)
        .filter(|(bucket, _)| bucket.is_some())
        .map(|(_, level)| level / MICRO)
        .min()
        .unwrap_or(want)
        .clamp(1, want.max(1));
    for (i, bucket) in config.iter().enumerate() {
        if bucket.is_some()
            && let Some(slot) = levels.get_mut(i)
        {
            *slot -= granted * MICRO;
        }
    }
    Acquire::Allowed {
        state: BucketState {
            levels,
            updated_ns: now_ns,
        },
        granted,
    }
}

/// How long leased tokens may be spent locally.
pub const LEASE_NS: u64 = 1_000_000_000;

/// Tokens a worker takes from the shared bucket at once: 1/64 of the smallest bucket's
/// capacity, between 1 and 32.
pub fn lease_size(limit: &RateLimit) -> u64 {
    buckets(limit)
        .iter()
        .flatten()
        .map(|(capacity, _)| *capacity)
        .min()
        .map_or(1, |capacity| (capacity / 64).clamp(1, 32))
}

/// Tokens one worker leased, by bucket key.
#[derive(Debug, Default)]
pub struct Leases(std::collections::HashMap<String, (u64, u64), crate::config::FastHash>);

impl Leases {
    /// Spends a leased token for `key` if one is left and the lease is still valid.
    pub fn take(&mut self, key: &str, now_ns: u64) -> bool {
        match self.0.get_mut(key) {
            Some((tokens, expires_ns)) if *tokens > 0 && now_ns < *expires_ns => {
                *tokens -= 1;
                true
            }
            _ => false,
        }
    }

    /// Records a grant of `granted` tokens taken from the shared bucket at `now_ns`, one
    /// of which the current request spends.
    pub fn granted(&mut self, key: &str, granted: u64, now_ns: u64) {
        let left = granted.saturating_sub(1);
        if left == 0 {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), (left, now_ns + LEASE_NS));
        }
    }

    /// Drops every lease (a new configuration may carry other limits).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run(limit: &RateLimit, times_s: &[f64]) -> Vec<bool> {
        let mut state = None;
        times_s
            .iter()
            .map(|t| match acquire(limit, state, (*t * S as f64) as u64, 1) {
                Acquire::Allowed { state: next, .. } => {
                    state = Some(next);
                    true
                }
                Acquire::Limited { .. } => false,
            })
            .collect()
    }

    #[test]
    fn burst_then_refill_per_minute() {
        let limit = RateLimit {
            per_minute: Some(60),
            burst: Some(3),
            ..Default::default()
        };
        // Three at once pass (burst), the fourth waits one second (60/min = 1/s).
        assert_eq!(
            run(&limit, &[0.0, 0.0, 0.0, 0.0, 1.0]),
            [true, true, true, false, true]
        );
    }

    #[test]
    fn without_burst_the_minute_capacity_is_the_limit() {
        let limit = RateLimit {
            per_minute: Some(2),
            ..Default::default()
        };
        assert_eq!(
            run(&limit, &[0.0, 0.1, 0.2, 30.2, 31.0]),
            [true, true, false, true, false]
        );
    }

    #[test]
    fn hour_and_day_buckets_hold_too() {
        let limit = RateLimit {
            per_minute: Some(100),
            per_hour: Some(3),
            ..Default::default()
        };
        assert_eq!(
            run(&limit, &[0.0, 1.0, 2.0, 3.0]),
            [true, true, true, false]
        );
        let limit = RateLimit {
            per_day: Some(1),
            ..Default::default()
        };
        assert_eq!(run(&limit, &[0.0, 3_600.0, 86_400.0]), [true, false, true]);
    }

    #[test]
    fn retry_after_is_the_wait_for_one_token() {
        let limit = RateLimit {
            per_minute: Some(6),
            burst: Some(1),
            ..Default::default()
        };
        let Acquire::Allowed { state, .. } = acquire(&limit, None, 0, 1) else {
            panic!()
        };
        assert_eq!(
            acquire(&limit, Some(state), 0, 1),
            Acquire::Limited { retry_after_s: 10 }
        );
        assert_eq!(
            acquire(&limit, Some(state), 5 * S, 1),
            Acquire::Limited { retry_after_s: 5 }
        );
    }

    #[test]
    fn a_lease_takes_what_is_there_up_to_the_ask() {
        let limit = RateLimit {
            per_minute: Some(600),
            burst: Some(10),
            ..Default::default()
        };
        let Acquire::Allowed { state, granted } = acquire(&limit, None, 0, 8) else {
            panic!()
        };
        assert_eq!(granted, 8);
        // Two left: a second ask for 8 gets 2, a third is limited.
        let Acquire::Allowed { state, granted } = acquire(&limit, Some(state), 0, 8) else {
            panic!()
        };
        assert_eq!(granted, 2);
        assert!(matches!(
            acquire(&limit, Some(state), 0, 8),
            Acquire::Limited { .. }
        ));
    }

    #[test]
    fn lease_sizes_scale_with_the_smallest_bucket() {
        let small = RateLimit {
            per_minute: Some(60),
            burst: Some(5),
            ..Default::default()
        };
        assert_eq!(lease_size(&small), 1);
        let large = RateLimit {
            per_minute: Some(1_000_000),
            per_day: Some(10_000_000),
            ..Default::default()
        };
        assert_eq!(lease_size(&large), 32);
        assert_eq!(lease_size(&RateLimit::default()), 1);
    }

    #[test]
    fn leases_are_spent_once_and_expire() {
        let mut leases = Leases::default();
        assert!(!leases.take("k", 0));
        leases.granted("k", 3, 0);
        assert!(leases.take("k", 1));
        assert!(leases.take("k", 2));
        assert!(!leases.take("k", 3), "two tokens were left after the first");
        leases.granted("k", 2, 10);
        assert!(!leases.take("k", 10 + LEASE_NS), "expired");
        leases.granted("k", 2, 0);
        leases.clear();
        assert!(!leases.take("k", 1));
    }

    #[test]
    fn state_round_trips() {
        let state = BucketState {
            levels: [1, 2, 3],
            updated_ns: 4,
        };
        assert_eq!(BucketState::decode(&state.encode()), Some(state));
        assert_eq!(BucketState::decode(&[0; 3]), None);
    }
}
