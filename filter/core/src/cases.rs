//! Runs the table-driven Rego cases in `rego/cases/*.json` against the core, and checks
//! that memoised decisions equal fresh ones on every case and on randomised requests.
//!
//! A case file holds a data document (timezones are compiled automatically for the
//! policies' `timezone` fields), optional custom modules, and cases: `request` facts
//! (`time` in RFC 3339) → `expect`ed decision fields. Requests go through the same
//! normalisation the filter applies.

use crate::config::{Bundle, RegoModule};
use crate::input::{RequestFacts, normalize_domain};
use crate::policy::CompiledPolicy;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct CaseFile {
    data: Value,
    #[serde(default)]
    modules: Vec<RegoModule>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    request: Request,
    expect: serde_json::Map<String, Value>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default, deny_unknown_fields)]
struct Request {
    fingerprint: String,
    authority: String,
    method: String,
    path: String,
    user_agent: String,
    source_ip: String,
    time: Option<String>,
}

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rego/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn unix_s(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .timestamp()
}

/// Adds offset tables for every timezone the policies name (2024..2030).
fn with_timezones(mut data: Value) -> Value {
    let mut zones = serde_json::Map::new();
    if let Some(policies) = data["policies"].as_object() {
        for policy in policies.values() {
            if let Some(tz) = policy["timezone"].as_str() {
                let table = crate::time::offset_table(
                    tz,
                    unix_s("2024-01-01T00:00:00Z"),
                    unix_s("2030-01-01T00:00:00Z"),
                )
                .unwrap();
                zones.insert(tz.to_owned(), serde_json::json!(table));
            }
        }
    }
    data["timezones"] = Value::Object(zones);
    data
}

fn facts(r: &Request) -> RequestFacts<'static> {
    let r = r.clone();
    RequestFacts {
        fingerprint: r.fingerprint.to_ascii_lowercase().into(),
        subject: "".into(),
        domain: normalize_domain(&r.authority).into_owned().into(),
        method: if r.method.is_empty() {
            "GET".into()
        } else {
            r.method.to_ascii_uppercase().into()
        },
        path: if r.path.is_empty() {
            "/".into()
        } else {
            r.path.into()
        },
        user_agent: r.user_agent.into(),
        source_ip: if r.source_ip.is_empty() {
            "10.0.0.1".into()
        } else {
            r.source_ip.into()
        },
        scheme: "https".into(),
        unix_ns: unix_s(r.time.as_deref().unwrap_or("2026-11-25T12:00:00Z")) as u64 * 1_000_000_000,
    }
}

fn load_bundle(file: &Path) -> (Bundle, Vec<Case>) {
    let cases: CaseFile = serde_json::from_slice(&std::fs::read(file).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut modules = CompiledPolicy::library_modules();
    modules.extend(cases.modules);
    let bundle = Bundle {
        modules,
        data: with_timezones(cases.data),
    };
    (bundle, cases.cases)
}

fn load(file: &Path) -> (CompiledPolicy, Vec<Case>) {
    let (bundle, cases) = load_bundle(file);
    let policy =
        CompiledPolicy::compile(&bundle).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    (policy, cases)
}

#[test]
fn rego_cases() {
    let (mut total, mut failures) = (0, Vec::new());
    for file in case_files() {
        let (mut policy, cases) = load(&file);
        for case in cases {
            total += 1;
            let got = serde_json::to_value(policy.evaluate_fresh(&facts(&case.request)).unwrap())
                .unwrap();
            for (key, want) in &case.expect {
                let got = got.get(key).cloned().unwrap_or(Value::Null);
                if &got != want {
                    failures.push(format!(
                        "{} / {}: {key} = {got} (want {want})",
                        file.file_name().unwrap().to_string_lossy(),
                        case.name,
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        total >= 80,
        "the suite must keep at least 80 cases, has {total}"
    );
    println!("{total} rego cases passed");
}

/// The memo never changes a decision: cached == fresh on every case, and on randomised
/// requests mixing the cases' fingerprints, domains, methods, paths, addresses and times;
/// also as the clock moves on, with decisions taken ahead of their expiry
/// ([`CompiledPolicy::warm`]).
/// A xorshift generator: the randomised tests repeat exactly.
fn random() -> impl FnMut() -> u64 {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The cases' requests, then `n` more, each mixing the fingerprint, authority, method,
/// path, address, user agent and time of random cases.
fn mixed_requests(cases: &[Case], n: usize, next: &mut impl FnMut() -> u64) -> Vec<Request> {
    let pool: Vec<Request> = cases.iter().map(|c| c.request.clone()).collect();
    let mut requests: Vec<Request> = pool.clone();
    for _ in 0..n {
        let mut pick = || &pool[(next() % pool.len() as u64) as usize];
        let mut r = pick().clone();
        r.authority = pick().authority.clone();
        r.method = pick().method.clone();
        r.path = pick().path.clone();
        r.source_ip = pick().source_ip.clone();
        r.user_agent = pick().user_agent.clone();
        r.time = pick().time.clone();
        requests.push(r);
    }
    requests
}

#[test]
fn memoised_decisions_equal_fresh_ones() {
    let mut next = random();
    let (mut checked, mut warmed) = (0, 0);
    for file in case_files() {
        let (mut policy, cases) = load(&file);
        let requests = mixed_requests(&cases, 300, &mut next);
        // Twice: the second pass is served from the memo.
        for _ in 0..2 {
            for r in &requests {
                let facts = facts(r);
                let cached = policy.evaluate(&facts).unwrap();
                let fresh = policy.evaluate_fresh(&facts).unwrap();
                assert_eq!(cached, fresh, "{}: {facts:?}", file.display());
                checked += 1;
            }
        }
        assert!(policy.memo_len() > 0);
        // Clock sweeps: each case's request again and again as time moves on in random
        // steps (seconds to hours, across the windows' edges, midnights and the DST
        // changes the cases sit on), so memoised decisions are used right up to where they
        // expire; and a step back in time now and then (a wall clock set back).
        for case in &cases {
            let mut facts = facts(&case.request);
            facts.unix_ns -= 3 * 3_600_000_000_000;
            for _ in 0..120 {
                let step_s = match next() % 4 {
                    0 => next() % 60,
                    1 => next() % 900,
                    2 => next() % 7_200,
                    _ => next() % 600 + 1,
                };
                facts.unix_ns += step_s * 1_000_000_000 + next() % 1_000_000_000;
                if next().is_multiple_of(50) {
                    facts.unix_ns -= 1_800_000_000_000;
                }
                // The filter's tick decides ahead what expires soon.
                warmed += policy.warm(facts.unix_ns, 1_000_000_000, 16);
                let cached = policy.evaluate(&facts).unwrap();
                let fresh = policy.evaluate_fresh(&facts).unwrap();
                assert_eq!(cached, fresh, "{}: {facts:?}", file.display());
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000);
    assert!(warmed > 50, "{warmed} decided ahead");
}

/// The entry cache (entries, and the engine prepared for the same modules) never changes a
/// decision: compiling every case file in turn with one cache (warm with the previous
/// files' entries, and with the same file's own entries and engine on a second pass, and
/// after a policy edit) decides every case like a fresh compile — from parsed bundles (the
/// control plane) and from configuration text (the filter), also with every agent
/// and policy, and the engine, prepared on first use because another VM validated them
/// ([`crate::data::Validated`]);
/// and so do memoised decisions inherited from the previous compile
/// ([`CompiledPolicy::inherit_memo`]).
/// The filter's configuration of `bundle`, as JSON text.
fn config_text(bundle: &Bundle) -> Vec<u8> {
    serde_json::to_vec(&crate::config::PluginConfig {
        base: None,
        version: "1".into(),
        mode: crate::config::Mode::Enforce,
        bundle: Some(bundle.clone()),
        audit: None,
    })
    .unwrap()
}

#[test]
fn cached_compiles_equal_fresh_ones() {
    let mut cache = crate::data::EntryCache::default();
    let mut raw_cache = crate::data::EntryCache::default();
    let mut previous: Option<CompiledPolicy> = None;
    let (mut checked, mut inherited) = (0, 0);
    for pass in 0..2 {
        for file in case_files() {
            let (mut bundle, cases) = load_bundle(&file);
            if pass == 1 {
                // The caches hold this very file first, so the edit below meets the same
                // keys in the same order: only the changed entries are replaced.
                let text = config_text(&bundle);
                let raw = crate::config::RawPluginConfig::from_slice(&text).unwrap();
                CompiledPolicy::compile_raw(
                    raw.bundle.as_ref().unwrap(),
                    &mut raw_cache,
                    &crate::data::Validated::default(),
                )
                .unwrap();
                CompiledPolicy::compile_with(&bundle, &mut cache).unwrap();
                // An edit the cache must notice: every policy's priority changes.
                if let Some(policies) = bundle.data["policies"].as_object_mut() {
                    for policy in policies.values_mut() {
                        let p = policy["priority"].as_i64().unwrap_or(0);
                        policy["priority"] = serde_json::json!(1_000 - p);
                    }
                }
            }
            let mut fresh = CompiledPolicy::compile(&bundle).unwrap();
            // The filter's path: the same configuration as JSON text, entries parsed only
            // on a cache miss.
            let text = config_text(&bundle);
            let raw = crate::config::RawPluginConfig::from_slice(&text).unwrap();
            let raw_bundle = raw.bundle.as_ref().unwrap();
            for _ in 0..2 {
                let mut cached = CompiledPolicy::compile_with(&bundle, &mut cache).unwrap();
                let mut from_text = CompiledPolicy::compile_raw(
                    raw_bundle,
                    &mut raw_cache,
                    &crate::data::Validated::default(),
                )
                .unwrap();
                // Another VM of this Envoy validated every agent: none is prepared now.
                let validated = crate::data::Validated::decode(&from_text.validated());
                let mut deferred = CompiledPolicy::compile_raw(
                    raw_bundle,
                    &mut crate::data::EntryCache::default(),
                    &validated,
                )
                .unwrap();
                assert_eq!(deferred.validated_here(), (0, 0, 0), "{}", file.display());
                // A worker reading the same bytes through the canary's index.
                let index = crate::config::ConfigIndex::build(&text, &raw).unwrap();
                let index = crate::config::ConfigIndex::decode(&index.encode()).unwrap();
                let through_index =
                    crate::config::RawPluginConfig::from_index(&text, &index).unwrap();
                let mut indexed = CompiledPolicy::compile_raw(
                    through_index.bundle.as_ref().unwrap(),
                    &mut crate::data::EntryCache::default(),
                    &crate::data::Validated::default(),
                )
                .unwrap();
                let mut inheriting = CompiledPolicy::compile_with(&bundle, &mut cache).unwrap();
                if let Some(previous) = previous.as_mut() {
                    inheriting.inherit_memo(previous);
                }
                for case in &cases {
                    let facts = facts(&case.request);
                    let want = fresh.evaluate_fresh(&facts).unwrap();
                    let (memoised, hit) = inheriting.evaluate_memo(&facts).unwrap();
                    inherited += usize::from(hit);
                    for (path, got) in [
                        ("cached", cached.evaluate_fresh(&facts).unwrap()),
                        ("text", from_text.evaluate_fresh(&facts).unwrap()),
                        ("deferred", deferred.evaluate_fresh(&facts).unwrap()),
                        ("indexed", indexed.evaluate_fresh(&facts).unwrap()),
                        ("inherited", (*memoised).clone()),
                    ] {
                        assert_eq!(
                            got,
                            want,
                            "{} / {} (pass {pass}, {path})",
                            file.display(),
                            case.name
                        );
                    }
                    checked += 1;
                }
                previous = Some(inheriting);
            }
        }
    }
    assert!(checked > 300);
    assert!(inherited > 100, "{inherited} decisions inherited");
}

/// Decisions inherited across pushes that edit domain lists equal fresh ones
/// ([`crate::data::Entries::domain_signature`]): per case file, the mixed requests are
/// decided, then 30 pushes each add or remove, in a random policy's random domain set, a
/// name the requests meet (a requested domain or one of its parents) or one they do not,
/// or now and then change a policy's priority (the decisions stand when that keeps the
/// order of their agent's policies) or mode; after each push every request is
/// decided again through the inherited memo and compared with a fresh evaluation.
#[test]
fn decisions_inherited_across_domain_list_edits_equal_fresh_ones() {
    let mut next = random();
    let (mut checked, mut kept_over_a_change, mut kept_over_a_priority) = (0, 0, 0);
    for file in case_files() {
        let (mut bundle, cases) = load_bundle(&file);
        let requests: Vec<RequestFacts<'static>> = mixed_requests(&cases, 60, &mut next)
            .iter()
            .map(facts)
            .collect();
        // What the pushes list: the requested domains and their parents, and a name no
        // request meets.
        let mut names: Vec<String> = vec!["unrequested.example".into()];
        for facts in &requests {
            let domain: &str = &facts.domain;
            let parents = crate::data::parent_suffixes(domain);
            for name in std::iter::once(domain).chain(parents) {
                if crate::data::domain_name(name) && !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
        }
        let ids: Vec<String> = bundle.data["policies"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut cache = crate::data::EntryCache::default();
        let mut policy = CompiledPolicy::compile_with(&bundle, &mut cache).unwrap();
        for facts in &requests {
            policy.evaluate_memo(facts).unwrap();
        }
        for push in 0..30 {
            let id = &ids[(next() % ids.len() as u64) as usize];
            let entry = &mut bundle.data["policies"][id];
            let kind = next() % 10;
            match kind {
                0 => entry["priority"] = (next() % 5).into(),
                1 => {
                    let dry = entry["mode"] == "dry_run";
                    entry["mode"] = if dry { "enforce" } else { "dry_run" }.into();
                }
                _ => {
                    let set = [
                        "allowed_exact",
                        "allowed_suffix",
                        "blocked_exact",
                        "blocked_suffix",
                    ][(next() % 4) as usize];
                    let name = &names[(next() % names.len() as u64) as usize];
                    if !entry[set].is_object() {
                        entry[set] = serde_json::json!({});
                    }
                    let listed = entry[set].as_object_mut().unwrap();
                    if listed.remove(name).is_none() {
                        listed.insert(name.clone(), true.into());
                    }
                }
            }
            let before: Vec<Option<u64>> = requests
                .iter()
                .map(|f| policy.signature(&f.fingerprint))
                .collect();
            let mut pushed = CompiledPolicy::compile_with(&bundle, &mut cache).unwrap();
            pushed.inherit_memo(&mut policy);
            policy = pushed;
            for (facts, before) in requests.iter().zip(before) {
                let (memoised, hit) = policy.evaluate_memo(facts).unwrap();
                // A miss was just evaluated fresh.
                if hit {
                    let fresh = policy.evaluate_fresh(facts).unwrap();
                    let at = format!("{} push {push}: {facts:?}", file.display());
                    assert_eq!(*memoised, fresh, "{at}");
                    checked += 1;
                    if before != policy.signature(&facts.fingerprint) {
                        kept_over_a_change += 1;
                        kept_over_a_priority += u32::from(kind == 0);
                    }
                }
            }
        }
    }
    println!(
        "{checked} inherited decisions checked, {kept_over_a_change} kept over a change, {kept_over_a_priority} of them over a priority change"
    );
    assert!(checked > 5_000, "{checked}");
    // Decisions kept although a push changed their agent's policies; some over a change
    // of priority that left the agent's policies in their order.
    assert!(kept_over_a_change > 1_000, "{kept_over_a_change}");
    assert!(kept_over_a_priority > 20, "{kept_over_a_priority}");
}
