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
    Allowed(BucketState),
    /// Over the limit: seconds until a token is available in every empty bucket.
    Limited {
        retry_after_s: u64,
    },
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
pub fn acquire(limit: &RateLimit, state: Option<BucketState>, now_ns: u64) -> Acquire {
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
    for (i, bucket) in config.iter().enumerate() {
        if bucket.is_some()
            && let Some(slot) = levels.get_mut(i)
        {
            *slot -= MICRO;
        }
    }
    Acquire::Allowed(BucketState {
        levels,
        updated_ns: now_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run(limit: &RateLimit, times_s: &[f64]) -> Vec<bool> {
        let mut state = None;
        times_s
            .iter()
            .map(|t| match acquire(limit, state, (*t * S as f64) as u64) {
                Acquire::Allowed(next) => {
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
        let Acquire::Allowed(state) = acquire(&limit, None, 0) else {
            panic!()
        };
        assert_eq!(
            acquire(&limit, Some(state), 0),
            Acquire::Limited { retry_after_s: 10 }
        );
        assert_eq!(
            acquire(&limit, Some(state), 5 * S),
            Acquire::Limited { retry_after_s: 5 }
        );
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
