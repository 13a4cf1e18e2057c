//! `cargo xtask build-filter`: compiles `filter-wasm` for `wasm32-wasip1` and shrinks it
//! with `wasm-opt` into `target/filter/chronoguard.wasm`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{cargo, human_size, run, wasm_out, wasm_raw};

/// Features the wasm module may use; every one is supported by Envoy's V8 runtime.
const WASM_OPT_FEATURES: &[&str] = &[
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-nontrapping-float-to-int",
    "--enable-mutable-globals",
    "--enable-multivalue",
    "--enable-reference-types",
];

/// The module's exports Envoy needs. The proxy-wasm SDK exports every callback of the ABI;
/// Envoy calls a callback for each stream event only if the module exports it, and every
/// call is a trip into V8. The filter acts on request headers only (Envoy's route copies
/// the decision id onto responses), so the per-stream callbacks for bodies, trailers,
/// response headers and access logging are removed: fewer V8 entries per request
/// (BENCHMARKS.md). `proxy_on_delete` stays (it frees stream contexts), as do the root
/// callbacks; `proxy_on_done` goes: without it Envoy treats every context as done at
/// once, which is what the filter's `on_done` answers anyway (the audit buffer is
/// VM-wide and outlives root contexts).
const KEPT_EXPORTS: &[&str] = &[
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    "proxy_on_http_call_response",
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "proxy_on_delete",
];

/// Builds and optimises the filter; returns the path of the optimised module.
pub fn build_filter() -> Result<PathBuf> {
    build(None)
}

/// A benchmark build that stops the request path after `stage` (see `filter/wasm/src/
/// http.rs`), written next to the real module as `chronoguard-<stage>.wasm`.
pub fn build_filter_stage(stage: &str) -> Result<PathBuf> {
    build(Some(stage))
}

fn build(stage: Option<&str>) -> Result<PathBuf> {
    // The `wasm` profile (release, opt-level "s") and `wasm-opt -Oz`: the same request
    // CPU as -O3 here, 18% smaller, and Envoy's V8 compiles the module faster at start
    // (BENCHMARKS.md).
    println!(
        "==> building filter-wasm (profile wasm, wasm32-wasip1{})",
        stage.map(|s| format!(", stage {s}")).unwrap_or_default()
    );
    let mut build = cargo();
    match stage {
        Some(stage) => build.env("CHRONOGUARD_FILTER_STAGE", stage),
        None => build.env_remove("CHRONOGUARD_FILTER_STAGE"),
    };
    run(build.args([
        "build",
        "--profile",
        "wasm",
        "--target",
        "wasm32-wasip1",
        "-p",
        "filter-wasm",
    ]))?;

    let raw = wasm_raw();
    let raw_size = file_size(&raw)?;
    let out = match stage {
        Some(stage) => wasm_out().with_file_name(format!("chronoguard-{stage}.wasm")),
        None => wasm_out(),
    };
    let dir = out.parent().context("module path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    println!("==> removing the exports Envoy must not call (wasm-metadce)");
    let graph = dir.join("exports-graph.json");
    std::fs::write(&graph, export_graph()).context("cannot write the export graph")?;
    let trimmed = dir.join("trimmed.wasm");
    run(Command::new("wasm-metadce")
        .args(WASM_OPT_FEATURES)
        .arg(&raw)
        .arg("--graph-file")
        .arg(&graph)
        .arg("-o")
        .arg(&trimmed)
        .stdout(std::process::Stdio::null()))?;

    println!("==> optimising with wasm-opt -Oz");
    run(Command::new("wasm-opt")
        .args(["-Oz", "--strip-debug", "--strip-producers"])
        .args(WASM_OPT_FEATURES)
        .arg(&trimmed)
        .arg("-o")
        .arg(&out))?;
    let out_size = file_size(&out)?;

    println!("==> raw       {}: {}", raw.display(), human_size(raw_size));
    println!("==> optimised {}: {}", out.display(), human_size(out_size));
    Ok(out)
}

fn file_size(path: &std::path::Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("expected build output {} is missing", path.display()))?
        .len())
}

/// The reachability graph `wasm-metadce` takes: one root reaching the kept exports; every
/// other export is dropped with the code only it reached. (The tool's format is JSON
/// without escapes; the names are plain identifiers.)
fn export_graph() -> String {
    let exports = KEPT_EXPORTS
        .iter()
        .map(|name| format!(r#"{{"name": "export:{name}", "export": "{name}"}}"#));
    let reaches = KEPT_EXPORTS
        .iter()
        .map(|name| format!(r#""export:{name}""#))
        .collect::<Vec<_>>()
        .join(", ");
    let root = format!(r#"{{"name": "envoy", "root": true, "reaches": [{reaches}]}}"#);
    let nodes: Vec<String> = exports.chain(std::iter::once(root)).collect();
    format!("[{}]", nodes.join(",\n"))
}
