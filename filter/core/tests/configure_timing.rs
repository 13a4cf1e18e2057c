//! How long `on_configure` work takes natively for a real plugin configuration (the
//! figure behind the policy-push stall in BENCHMARKS.md). Ignored by default; run with
//! `CHRONOGUARD_PLUGIN_CONFIG=<file> cargo test -p filter-core --profile bench-tools
//! --test configure_timing -- --ignored --nocapture`, the file holding the JSON of the
//! ECDS resource's `configuration` (`CHRONOGUARD_BENCH_CONFIG_DUMP=<file> cargo xtask
//! bench --only filter` writes the bench's).

use filter_core::config::{ConfigIndex, PluginConfig, RawPluginConfig};
use filter_core::data::{EntryCache, Validated};
use filter_core::policy::CompiledPolicy;
use std::time::Instant;

/// The configuration named by `CHRONOGUARD_PLUGIN_CONFIG`; `None` (the test does nothing)
/// without it. (Test helpers: a missing file fails the run like an unwrap in the test.)
#[allow(clippy::unwrap_used)]
fn config_file() -> Option<Vec<u8>> {
    let path = std::env::var_os("CHRONOGUARD_PLUGIN_CONFIG")?;
    Some(std::fs::read(path).unwrap())
}

/// A one-policy push: the first policy's priority set to `priority`.
#[allow(clippy::indexing_slicing)]
fn set_first_priority(bundle: &mut filter_core::config::Bundle, priority: usize) {
    if let Some(policy) = bundle.data["policies"]
        .as_object_mut()
        .and_then(|p| p.values_mut().next())
    {
        policy["priority"] = serde_json::json!(priority);
    }
}

/// Two configurations that differ in the first policy's priority.
#[allow(clippy::unwrap_used)]
fn one_policy_apart(bytes: &[u8]) -> Vec<Vec<u8>> {
    let config = PluginConfig::from_slice(bytes).unwrap();
    (0..2)
        .map(|n| {
            let mut config = config.clone();
            set_first_priority(config.bundle.as_mut().unwrap(), n + 1000);
            serde_json::to_vec(&config).unwrap()
        })
        .collect()
}

/// The set a canary publishes after validating a configuration on its own.
#[allow(clippy::unwrap_used)]
fn canary_validated(bytes: &[u8]) -> Vec<u8> {
    let raw = RawPluginConfig::from_slice(bytes).unwrap();
    CompiledPolicy::compile_raw(
        raw.bundle.as_ref().unwrap(),
        &mut EntryCache::default(),
        &Validated::default(),
    )
    .unwrap()
    .validated()
}

/// A VM's prepared and kept entries after loading `config` in full.
#[allow(clippy::unwrap_used)]
fn loaded(config: &RawPluginConfig<'_>) -> (EntryCache, filter_core::delta::Retained) {
    let mut cache = EntryCache::default();
    let bundle = config.bundle.as_ref().unwrap();
    drop(CompiledPolicy::compile_raw(bundle, &mut cache, &Validated::default()).unwrap());
    (cache, filter_core::delta::Retained::keep(config).unwrap())
}

/// The delta `text` parsed as the push of version `round` on version `round - 1`.
#[allow(clippy::unwrap_used)]
fn chained(text: &[u8], round: usize) -> RawPluginConfig<'_> {
    let mut raw = RawPluginConfig::from_slice(text).unwrap();
    raw.version = round.to_string();
    raw.base = Some((round - 1).to_string());
    raw
}

/// The deltas from each of `contents` (two configurations) to the other, each with the
/// set a canary published: for the delta's own configuration, or (`previous`) for its
/// base, as the previous canary left it.
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
fn toggling_deltas(contents: &[Vec<u8>], previous: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..2)
        .map(|n| {
            let d = filter_core::delta::delta(&contents[1 - n], &contents[n])
                .unwrap()
                .unwrap();
            let validated = if previous { 1 - n } else { n };
            (d, canary_validated(&contents[validated]))
        })
        .collect()
}

/// `CHRONOGUARD_ROUNDS`, or `default`.
fn rounds(default: usize) -> usize {
    std::env::var("CHRONOGUARD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Time per step, summed over rounds.
struct Steps {
    at: Instant,
    totals: Vec<std::time::Duration>,
}

impl Steps {
    fn new(steps: usize) -> Self {
        Self {
            at: Instant::now(),
            totals: vec![std::time::Duration::ZERO; steps],
        }
    }

    /// A round starts.
    fn start(&mut self) {
        self.at = Instant::now();
    }

    /// Step `n` ended.
    fn step(&mut self, n: usize) {
        let now = Instant::now();
        if let Some(total) = self.totals.get_mut(n) {
            *total += now - self.at;
        }
        self.at = now;
    }

    /// Each step's mean over `rounds`.
    fn per(&self, rounds: usize) -> Vec<std::time::Duration> {
        self.totals.iter().map(|t| *t / rounds as u32).collect()
    }
}

#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
fn configure_timing() {
    let Some(bytes) = config_file() else {
        return;
    };
    let mut cache = EntryCache::default();
    let mut raw_cache = EntryCache::default();
    for round in 0..5 {
        let started = Instant::now();
        let mut config = PluginConfig::from_slice(&bytes).unwrap();
        let parsed = started.elapsed();
        let bundle = config.bundle.as_mut().unwrap();
        let cold = Instant::now();
        drop(CompiledPolicy::compile(bundle).unwrap());
        let cold = cold.elapsed();
        // A push that changes one policy, with the previous configuration's entries cached.
        drop(CompiledPolicy::compile_with(bundle, &mut cache).unwrap());
        let unchanged = serde_json::to_vec(&*bundle).unwrap();
        set_first_priority(bundle, round + 1000);
        let warm = Instant::now();
        drop(CompiledPolicy::compile_with(bundle, &mut cache).unwrap());
        let warm = warm.elapsed();
        // The filter's path: configuration text in, unchanged entries neither parsed nor
        // prepared (the raw cache is warm with the unchanged configuration).
        let changed = serde_json::to_vec(&config).unwrap();
        let unchanged = serde_json::to_vec(&PluginConfig {
            base: None,
            bundle: Some(serde_json::from_slice(&unchanged).unwrap()),
            ..config.clone()
        })
        .unwrap();
        let nothing = Validated::default();
        let raw = RawPluginConfig::from_slice(&unchanged).unwrap();
        let previous =
            CompiledPolicy::compile_raw(raw.bundle.as_ref().unwrap(), &mut raw_cache, &nothing)
                .unwrap();
        // A long-lived VM: the one-policy change read through the canary's index of the
        // same bytes, and by parsing them.
        let index =
            ConfigIndex::build(&changed, &RawPluginConfig::from_slice(&changed).unwrap()).unwrap();
        let mut indexed_cache = EntryCache::default();
        let before = RawPluginConfig::from_slice(&unchanged).unwrap();
        drop(
            CompiledPolicy::compile_raw(
                before.bundle.as_ref().unwrap(),
                &mut indexed_cache,
                &nothing,
            )
            .unwrap(),
        );
        // What a long-lived VM does in Envoy: the index, the set the canary validated
        // (it validated the one changed policy), the entries, each step timed.
        let published = {
            let raw = RawPluginConfig::from_slice(&changed).unwrap();
            CompiledPolicy::compile_raw(
                raw.bundle.as_ref().unwrap(),
                &mut EntryCache::default(),
                &nothing,
            )
            .unwrap()
            .validated()
        };
        let through_index = Instant::now();
        let raw = RawPluginConfig::from_index(&changed, &index).unwrap();
        let index_read = through_index.elapsed();
        let validated = Validated::decode(&published);
        let decoded = through_index.elapsed();
        let policy = CompiledPolicy::compile_raw(
            raw.bundle.as_ref().unwrap(),
            &mut indexed_cache,
            &validated,
        )
        .unwrap();
        let compiled = through_index.elapsed();
        drop(policy);
        let through_index = through_index.elapsed();
        println!(
            "long-lived VM through the index: read {index_read:?}, validated set decoded {:?}, entries {:?}, dropped {:?}",
            decoded - index_read,
            compiled - decoded,
            through_index - compiled
        );

        let text = Instant::now();
        let raw = RawPluginConfig::from_slice(&changed).unwrap();
        drop(
            CompiledPolicy::compile_raw(raw.bundle.as_ref().unwrap(), &mut raw_cache, &nothing)
                .unwrap(),
        );
        let text = text.elapsed();
        // Envoy's configuration canary: a fresh VM, from text, every entry validated by
        // the previous configuration's canary or by none.
        let canary = |validated: &Validated| {
            let started = Instant::now();
            let raw = RawPluginConfig::from_slice(&changed).unwrap();
            drop(
                CompiledPolicy::compile_raw(
                    raw.bundle.as_ref().unwrap(),
                    &mut EntryCache::default(),
                    validated,
                )
                .unwrap(),
            );
            started.elapsed()
        };
        let alone = canary(&nothing);
        let shared = canary(&Validated::decode(&previous.validated()));
        println!(
            "{} bytes: parse {parsed:?}, compile {cold:?}, compile after a one-policy change with the entry cache {warm:?}; from text (parse + compile) after that change {text:?}, through the index {through_index:?}; a fresh VM from text {alone:?}, with the entries validated elsewhere {shared:?}",
            bytes.len()
        );
    }
}

fn convert(value: &serde_json::Value) -> regorus::Value {
    use serde_json::Value as J;
    match value {
        J::Null => regorus::Value::Null,
        J::Bool(b) => regorus::Value::from(*b),
        J::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => regorus::Value::from(u),
            (None, Some(i)) => regorus::Value::from(i),
            _ => regorus::Value::from(n.as_f64().unwrap_or(0.0)),
        },
        J::String(s) => regorus::Value::from(s.as_str()),
        J::Array(items) => regorus::Value::from(items.iter().map(convert).collect::<Vec<_>>()),
        J::Object(map) => regorus::Value::from(
            map.iter()
                .map(|(k, v)| (regorus::Value::from(k.as_str()), convert(v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
    }
}

#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
fn conversion_timing() {
    let Some(bytes) = config_file() else {
        return;
    };
    let config = PluginConfig::from_slice(&bytes).unwrap();
    let data = config.bundle.unwrap().data;
    for _ in 0..5 {
        let started = Instant::now();
        let a = <regorus::Value as serde::Deserialize>::deserialize(data.clone()).unwrap();
        let deser = started.elapsed();
        let started = Instant::now();
        let b = convert(&data);
        let conv = started.elapsed();
        let started = Instant::now();
        let text = serde_json::to_string(&data).unwrap();
        let c = regorus::Value::from_json_str(&text).unwrap();
        let from_text = started.elapsed();
        assert_eq!(a, b);
        assert_eq!(a, c);
        println!(
            "deserialize (incl. clone) {deser:?}, convert {conv:?}, text + from_json_str {from_text:?}"
        );
    }
}

/// A long-lived VM's load after a one-policy push, repeated (for `perf`): the index of
/// the same bytes, the set the canary validated, the entries of the previous load cached.
#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
fn worker_load_timing() {
    let Some(bytes) = config_file() else {
        return;
    };
    // Two configurations that differ in one policy, loaded in turn.
    let variants = one_policy_apart(&bytes);
    let prepared: Vec<(ConfigIndex, Vec<u8>)> = variants
        .iter()
        .map(|bytes| {
            let raw = RawPluginConfig::from_slice(bytes).unwrap();
            (
                ConfigIndex::build(bytes, &raw).unwrap(),
                canary_validated(bytes),
            )
        })
        .collect();
    let mut cache = EntryCache::default();
    let rounds = 400;
    let started = Instant::now();
    for round in 0..rounds {
        let (bytes, (index, published)) = (&variants[round % 2], &prepared[round % 2]);
        let raw = RawPluginConfig::from_index(bytes, index).unwrap();
        let validated = Validated::decode(published);
        drop(
            CompiledPolicy::compile_raw(raw.bundle.as_ref().unwrap(), &mut cache, &validated)
                .unwrap(),
        );
    }
    println!(
        "long-lived VM, one-policy push through the index: {:?} per load",
        started.elapsed() / rounds as u32
    );
}

/// A long-lived VM's load of one-policy pushes sent as deltas, repeated, each step timed:
/// the delta parsed, merged with the entries kept of its base, the set the canary
/// validated decoded, the entries prepared, the kept entries updated. The pushes toggle
/// the first policy's priority between two values, each under a new version.
#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
fn worker_delta_timing() {
    let Some(bytes) = config_file() else {
        return;
    };
    let contents = one_policy_apart(&bytes);
    // The delta to each content from the other, and the set the canary validated for it.
    let deltas = toggling_deltas(&contents, false);
    let mut first = RawPluginConfig::from_slice(&contents[0]).unwrap();
    first.version = "0".into();
    let (mut cache, mut retained) = loaded(&first);
    let rounds = rounds(2_000);
    let mut steps = Steps::new(6);
    let started = Instant::now();
    for round in 1..=rounds {
        let (d, published) = &deltas[round % 2];
        steps.start();
        let raw = chained(d, round);
        steps.step(0);
        let (merged, changes) = retained.merge(raw).unwrap();
        steps.step(1);
        let validated = Validated::decode(published);
        steps.step(2);
        let policy =
            CompiledPolicy::compile_raw(merged.bundle.as_ref().unwrap(), &mut cache, &validated)
                .unwrap();
        steps.step(3);
        drop(merged);
        retained.apply(changes);
        steps.step(4);
        drop(policy);
        steps.step(5);
    }
    let per = |d: std::time::Duration| d / rounds as u32;
    let merged = started.elapsed();
    let steps = steps.per(rounds);
    // The same pushes compiled from what each delta lists, on the entries of its base.
    let (mut cache, mut retained) = loaded(&first);
    let started = Instant::now();
    for round in 1..=rounds {
        let (d, published) = &deltas[round % 2];
        let raw = chained(d, round);
        let changes = retained.changes(&raw).unwrap();
        let validated = Validated::decode(published);
        let policy =
            CompiledPolicy::compile_raw_delta(raw.bundle.as_ref().unwrap(), &mut cache, &validated)
                .unwrap()
                .unwrap();
        retained.apply(changes);
        drop(policy);
    }
    println!(
        "long-lived VM, one-policy delta compiled from what it lists: {:?} per load; merged: {:?}",
        per(started.elapsed()),
        per(merged)
    );
    println!(
        "long-lived VM, one-policy delta ({} bytes), merged: {:?} per load: parse {:?}, merge {:?}, validated set {:?}, entries {:?}, apply {:?}, drop {:?}",
        deltas[0].0.len(),
        per(merged),
        steps[0],
        steps[1],
        steps[2],
        steps[3],
        steps[4],
        steps[5],
    );
}

/// Envoy's canary (a fresh VM per push) loading a one-policy delta, repeated, each step
/// timed and printed as `what` with `steps` (their names, the first one the previous
/// canary's published entries decoded). `load` takes the entries, the delta and the
/// validated set the previous canary published, and returns what it publishes in turn.
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
fn canary_rounds(
    what: &str,
    steps: &[&str],
    mut load: impl FnMut(
        filter_core::delta::Retained,
        RawPluginConfig<'_>,
        &[u8],
        &mut Steps,
    ) -> Vec<u8>,
) {
    let Some(bytes) = config_file() else {
        return;
    };
    let contents = one_policy_apart(&bytes);
    let deltas = toggling_deltas(&contents, true);
    let first = RawPluginConfig::from_slice(&contents[0]).unwrap();
    let (_, retained) = loaded(&first);
    let mut published = retained.encode();
    let rounds = rounds(200);
    let mut timed = Steps::new(steps.len());
    let started = Instant::now();
    for round in 1..=rounds {
        let (d, validated) = &deltas[round % 2];
        // The host hands the canary its own copy of the shared data.
        let shared = published.clone();
        timed.start();
        let retained = filter_core::delta::Retained::decode(shared).unwrap();
        let mut raw = chained(d, round);
        raw.base = Some(retained.version().to_owned());
        timed.step(0);
        published = load(retained, raw, validated, &mut timed);
    }
    let total = started.elapsed() / rounds as u32;
    let each: Vec<String> = steps
        .iter()
        .zip(timed.per(rounds))
        .map(|(name, t)| format!("{name} {t:?}"))
        .collect();
    println!("{what}: {total:?} per load: {}", each.join(", "));
}

/// The canary merging the delta with the published entries and preparing the whole
/// configuration on an empty cache (every entry but the changed one validated already),
/// then encoding the merged entries for the next canary: its way before
/// `CompiledPolicy::check_delta`, and still when that hands a delta back.
#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
#[allow(clippy::unwrap_used)]
fn canary_delta_timing() {
    let steps = [
        "published entries decoded",
        "merge",
        "prepared",
        "published again",
        "dropped",
    ];
    canary_rounds(
        "canary, one-policy delta merged",
        &steps,
        |mut retained, raw, validated, timed| {
            let (merged, changes) = retained.merge(raw).unwrap();
            timed.step(1);
            let validated = Validated::decode(validated);
            let policy = CompiledPolicy::compile_raw(
                merged.bundle.as_ref().unwrap(),
                &mut EntryCache::default(),
                &validated,
            )
            .unwrap();
            timed.step(2);
            let republished = policy.validated();
            drop(merged);
            retained.apply(changes);
            let published = retained.encode();
            timed.step(3);
            drop((policy, republished, retained));
            timed.step(4);
            published
        },
    );
}

/// The canary's load of a one-policy delta checked against the published entries
/// (`CompiledPolicy::check_delta`): what Envoy's main thread pays per push.
#[test]
#[ignore = "timing; needs CHRONOGUARD_PLUGIN_CONFIG"]
#[allow(clippy::unwrap_used)]
fn canary_checked_timing() {
    let steps = [
        "published entries decoded",
        "checked",
        "published again",
        "dropped",
    ];
    canary_rounds(
        "canary, one-policy delta checked",
        &steps,
        |mut retained, raw, validated, timed| {
            let validated = Validated::decode(validated);
            let checked = CompiledPolicy::check_delta(&retained, &raw, &validated).unwrap();
            timed.step(1);
            retained.apply(retained.changes(&raw).unwrap());
            let published = retained.encode();
            timed.step(2);
            drop((checked, retained, validated));
            timed.step(3);
            published
        },
    );
}
