//! Runs the table-driven Rego cases in `rego/cases/*.json` against the core.
//!
//! Each file holds a data document and cases (`request` facts → `expect`ed decision
//! fields). The request goes through the same normalisation the filter applies.

use filter_core::config::Bundle;
use filter_core::input::{RequestFacts, normalize_domain};
use filter_core::policy::CompiledPolicy;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct CaseFile {
    data: serde_json::Value,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    request: Request,
    expect: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Request {
    fingerprint: String,
    authority: String,
    method: String,
    path: String,
    user_agent: String,
    source_ip: String,
    unix_ns: u64,
}

#[test]
fn rego_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rego/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let (mut total, mut failures) = (0, Vec::new());
    for file in files {
        let cases: CaseFile = serde_json::from_slice(&std::fs::read(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let bundle = Bundle {
            modules: CompiledPolicy::library_modules(),
            data: cases.data,
        };
        let mut policy = CompiledPolicy::compile(&bundle).unwrap();
        for case in cases.cases {
            total += 1;
            let r = case.request;
            let facts = RequestFacts {
                fingerprint: r.fingerprint.to_ascii_lowercase(),
                subject: String::new(),
                domain: normalize_domain(&r.authority),
                method: if r.method.is_empty() {
                    "GET".into()
                } else {
                    r.method
                },
                path: if r.path.is_empty() {
                    "/".into()
                } else {
                    r.path
                },
                user_agent: r.user_agent,
                source_ip: r.source_ip,
                scheme: "https".into(),
                unix_ns: r.unix_ns,
            };
            let got = serde_json::to_value(policy.evaluate(&facts).unwrap()).unwrap();
            for (key, want) in &case.expect {
                if &got[key] != want {
                    failures.push(format!(
                        "{} / {}: {key} = {} (want {want})",
                        file.file_name().unwrap().to_string_lossy(),
                        case.name,
                        got[key]
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
    println!("{total} rego cases passed");
}
