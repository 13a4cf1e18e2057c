//! How long a memo miss (one whole regorus evaluation) takes natively on a real plugin
//! configuration: the work a push that changes an agent's policy, or a time boundary,
//! costs per agent × domain (BENCHMARKS.md, "Fourteenth session"). Ignored by default; run
//! with `CHRONOGUARD_PLUGIN_CONFIG=<file> CHRONOGUARD_FINGERPRINT=<agent> cargo test -p
//! filter-core --profile bench-tools --test miss_timing -- --ignored --nocapture` (the
//! file as for `configure_timing`; the bench's load agent is `agent-0`). Under `valgrind
//! --tool=callgrind` the difference between two request counts (`CHRONOGUARD_MISSES`) is
//! the instructions per evaluation, a figure that repeats to a few hundred instructions.

use filter_core::config::PluginConfig;
use filter_core::input::RequestFacts;
use filter_core::policy::CompiledPolicy;
use std::borrow::Cow;
use std::time::Instant;

#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG and CHRONOGUARD_FINGERPRINT"]
// Test helpers: a missing or malformed file fails the run like an unwrap in the test.
#[allow(clippy::unwrap_used, clippy::expect_used)]
fn miss_timing() {
    let (Some(path), Ok(fingerprint)) = (
        std::env::var_os("CHRONOGUARD_PLUGIN_CONFIG"),
        std::env::var("CHRONOGUARD_FINGERPRINT"),
    ) else {
        return;
    };
    let misses: u32 = std::env::var("CHRONOGUARD_MISSES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
        .max(1);
    let config = PluginConfig::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut policy = CompiledPolicy::compile(config.bundle.as_ref().unwrap()).unwrap();
    let started = Instant::now();
    // Alternately a domain no policy lists and one the bench allows: a denial that runs
    // every policy to its end, and an allow with its time window.
    for i in 0..misses {
        let domain = match i % 2 {
            0 => Cow::Owned(format!("m{i}.example")),
            _ => Cow::Borrowed("allowed-0.example"),
        };
        let facts = RequestFacts {
            fingerprint: Cow::Borrowed(&fingerprint),
            subject: Cow::Borrowed("CN=bench"),
            domain,
            method: Cow::Borrowed("GET"),
            path: Cow::Borrowed("/v1/objects/abc"),
            user_agent: Cow::Borrowed("chronoguard-bench"),
            source_ip: Cow::Borrowed("127.0.0.1"),
            scheme: Cow::Borrowed("https"),
            unix_ns: 1_764_540_000_000_000_000 + u64::from(i),
        };
        policy
            .evaluate_fresh(&facts)
            .expect("the bench's agent decides");
    }
    println!(
        "{misses} evaluations, {:?} each",
        started.elapsed() / misses
    );
}
