//! How long one regorus evaluation takes on a bundle with long domain lists (the figure in
//! BENCHMARKS.md / rego/README.md). Ignored by default; run natively with
//! `cargo test -p filter-core --profile bench-tools --test eval_timing -- --ignored --nocapture`.

use filter_core::config::Bundle;
use filter_core::input::RequestFacts;
use filter_core::policy::CompiledPolicy;
use serde_json::{Map, Value, json};
use std::time::Instant;

const POLICIES: usize = 20;

/// The policy's domain fields as the bundle carries them (indexed like the compiler does).
fn domain_fields(allowed: &[String], blocked: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    for (kind, patterns) in [("allowed", allowed), ("blocked", blocked)] {
        let (exact, suffix) = filter_core::data::index_domains(patterns);
        out.insert(format!("{kind}_exact"), Value::Object(exact));
        out.insert(format!("{kind}_suffix"), Value::Object(suffix));
    }
    out
}

fn bundle(domains: usize) -> Bundle {
    let mut policies = Map::new();
    let mut ids = Vec::new();
    for p in 0..POLICIES {
        let id = format!("policy-{p:02}");
        let allowed: Vec<String> = (0..domains)
            .map(|d| {
                if d % 2 == 0 {
                    format!("site{d}.p{p}.example")
                } else {
                    format!("*.wild{d}.p{p}.example")
                }
            })
            .collect();
        let blocked: Vec<String> = (0..domains)
            .map(|d| format!("bad{d}.p{p}.example"))
            .collect();
        let mut policy = json!({"id": id, "tenant_id": "t", "name": id, "priority": 100,
            "status": "active", "mode": "enforce"});
        if let Some(object) = policy.as_object_mut() {
            object.extend(domain_fields(&allowed, &blocked));
        }
        policies.insert(id.clone(), policy);
        ids.push(id);
    }
    let data = json!({
        "agents": {"fp": {"id": "a", "tenant_id": "t", "name": "bot", "status": "active",
                          "policies": ids}},
        "policies": policies,
        "timezones": {},
    });
    Bundle {
        modules: CompiledPolicy::library_modules(),
        data,
    }
}

#[test]
#[ignore = "timing; run explicitly with --ignored --nocapture"]
fn evaluation_time_with_long_domain_lists() {
    for domains in [10, 500] {
        let mut policy = CompiledPolicy::compile(&bundle(domains)).unwrap();
        time_bundle(&mut policy, domains);
    }
}

fn time_bundle(policy: &mut CompiledPolicy, domains: usize) {
    let last = domains - 2;
    let requests = [
        (format!("site{last}.p19.example"), true),
        (format!("x.y.wild{}.p19.example", last + 1), true),
        ("bad3.p7.example".to_owned(), false),
        ("nowhere.example".to_owned(), false),
    ];
    for (domain, allow) in requests {
        let domain = domain.as_str();
        let facts = RequestFacts {
            fingerprint: "fp".into(),
            domain: domain.into(),
            method: "GET".into(),
            path: "/".into(),
            scheme: "https".into(),
            unix_ns: 1_764_000_000_000_000_000,
            ..Default::default()
        };
        let decision = policy.evaluate_fresh(&facts).map_err(|e| e.to_string());
        assert_eq!(decision.as_ref().map(|d| d.allow), Ok(allow), "{domain}");
        let rounds = 200;
        let started = Instant::now();
        for _ in 0..rounds {
            let _ = policy.evaluate_fresh(&facts);
        }
        let per = started.elapsed() / rounds;
        println!(
            "{POLICIES} policies x {domains} allowed + {domains} blocked: {domain}: {per:?} per evaluation"
        );
    }
}
