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
/// the decision id onto responses) and keeps no state per stream, so it enters through
/// its own entry points (`filter/wasm/src/abi.rs`, exported as `chronoguard_on_*`), and
/// all the SDK's `proxy_on_*` callbacks but the memory allocator are removed, among them
/// the per-stream `proxy_on_context_create` and `proxy_on_delete`: one V8 entry per
/// request instead of three (BENCHMARKS.md).
const KEPT_EXPORTS: &[&str] = &[
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "chronoguard_on_vm_start",
    "chronoguard_on_configure",
    "chronoguard_on_tick",
    "chronoguard_on_http_call_response",
    "chronoguard_on_request_headers",
];

/// Exports renamed into the ABI's names once the SDK's are gone.
const RENAMED_PREFIX: (&str, &str) = ("chronoguard_on_", "proxy_on_");

/// Builds and optimises the filter; returns the path of the optimised module.
pub fn build_filter() -> Result<PathBuf> {
    build(None, false)
}

/// A benchmark build that stops the request path after `stage` (see `filter/wasm/src/
/// http.rs`), written next to the real module as `chronoguard-<stage>.wasm`.
pub fn build_filter_stage(stage: &str) -> Result<PathBuf> {
    build(Some(stage), false)
}

/// The real module with its function names kept (`chronoguard-names.wasm`), for
/// profiles: `node --perf-basic-prof` then names the guest's functions in `perf report`
/// (BENCHMARKS.md, "Ninth session"). Not for Envoy: the names add 15% to the module.
pub fn build_filter_named() -> Result<PathBuf> {
    build(None, true)
}

fn build(stage: Option<&str>, names: bool) -> Result<PathBuf> {
    // The `wasm` profile (release, opt-level "s", the request path's own crates at 2; see
    // the workspace Cargo.toml) and `wasm-opt -Oz`: Envoy's V8 compiles the whole module
    // when a worker starts, so size counts (BENCHMARKS.md).
    println!(
        "==> building filter-wasm (profile wasm, wasm32-wasip1{})",
        stage.map(|s| format!(", stage {s}")).unwrap_or_default()
    );
    let mut build = cargo();
    match stage {
        Some(stage) => build.env("CHRONOGUARD_FILTER_STAGE", stage),
        None => build.env_remove("CHRONOGUARD_FILTER_STAGE"),
    };
    // Stripping symbols drops the name section wasm-opt would keep.
    build.env(
        "CARGO_PROFILE_WASM_STRIP",
        if names { "false" } else { "true" },
    );
    let keep_names: &[&str] = if names { &["-g"] } else { &[] };
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
    let out = match (stage, names) {
        (Some(stage), _) => wasm_out().with_file_name(format!("chronoguard-{stage}.wasm")),
        (None, true) => wasm_out().with_file_name("chronoguard-names.wasm"),
        (None, false) => wasm_out(),
    };
    let dir = out.parent().context("module path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    println!("==> removing the exports Envoy must not call (wasm-metadce)");
    let graph = dir.join("exports-graph.json");
    std::fs::write(&graph, export_graph()).context("cannot write the export graph")?;
    let trimmed = dir.join("trimmed.wasm");
    run(Command::new("wasm-metadce")
        .args(keep_names)
        .args(WASM_OPT_FEATURES)
        .arg(&raw)
        .arg("--graph-file")
        .arg(&graph)
        .arg("-o")
        .arg(&trimmed)
        .stdout(std::process::Stdio::null()))?;

    println!("==> renaming the filter's entry points into the ABI's names");
    let module = std::fs::read(&trimmed).context("cannot read the trimmed module")?;
    let renamed = rename_exports(&module, RENAMED_PREFIX)?;
    std::fs::write(&trimmed, renamed).context("cannot write the renamed module")?;

    println!("==> optimising with wasm-opt -Oz");
    let strip: &[&str] = if names {
        &["-g"]
    } else {
        &["--strip-debug", "--strip-producers"]
    };
    run(Command::new("wasm-opt")
        .arg("-Oz")
        .args(strip)
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

/// `module` with every export named `<from>…` renamed `<to>…` (the export section
/// rewritten; binaryen has no pass for it). Fails on a malformed module or a name clash.
fn rename_exports(module: &[u8], (from, to): (&str, &str)) -> Result<Vec<u8>> {
    let header = module.get(..8).context("not a wasm module")?;
    let mut out = header.to_vec();
    let mut at = 8;
    while at < module.len() {
        let id = module[at];
        let (size, body_at) = read_leb(module, at + 1)?;
        let body = module
            .get(body_at..body_at + size)
            .context("truncated wasm section")?;
        at = body_at + size;
        if id != 7 {
            out.push(id);
            write_leb(&mut out, size);
            out.extend_from_slice(body);
            continue;
        }
        let (count, mut p) = read_leb(body, 0)?;
        let mut section = Vec::new();
        let mut names = std::collections::HashSet::new();
        write_leb(&mut section, count);
        for _ in 0..count {
            let (len, name_at) = read_leb(body, p)?;
            let name = body
                .get(name_at..name_at + len)
                .and_then(|n| std::str::from_utf8(n).ok())
                .context("bad export name")?;
            let (_, index_end) = read_leb(body, name_at + len + 1)?;
            let rest = body
                .get(name_at + len..index_end)
                .context("truncated export")?;
            p = index_end;
            let name = match name.strip_prefix(from) {
                Some(tail) => format!("{to}{tail}"),
                None => name.to_owned(),
            };
            anyhow::ensure!(
                names.insert(name.clone()),
                "export `{name}` would be defined twice"
            );
            write_leb(&mut section, name.len());
            section.extend_from_slice(name.as_bytes());
            section.extend_from_slice(rest);
        }
        out.push(id);
        write_leb(&mut out, section.len());
        out.extend(section);
    }
    Ok(out)
}

/// An unsigned LEB128 at `at`: its value and the offset after it.
fn read_leb(bytes: &[u8], mut at: usize) -> Result<(usize, usize)> {
    let mut value = 0usize;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(at).context("truncated LEB128")?;
        at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, at));
        }
    }
    anyhow::bail!("LEB128 too long")
}

fn write_leb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with one function exported twice, plus a custom section after the exports.
    fn module(names: &[&str]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend([1, 4, 1, 0x60, 0, 0]); // type section: () -> ()
        m.extend([3, 2, 1, 0]); // function section: one function of type 0
        let mut exports = Vec::new();
        write_leb(&mut exports, names.len());
        for name in names {
            write_leb(&mut exports, name.len());
            exports.extend(name.as_bytes());
            exports.extend([0, 0]); // function 0
        }
        m.push(7);
        write_leb(&mut m, exports.len());
        m.extend(exports);
        m.extend([10, 4, 1, 2, 0, 0x0b]); // code section: an empty body
        m.extend([0, 3, 1, b'x', 9]); // custom section "x"
        m
    }

    #[test]
    fn renames_the_prefixed_exports_and_keeps_the_rest() {
        let long = "chronoguard_on_".to_owned() + &"y".repeat(200);
        let renamed = rename_exports(
            &module(&["chronoguard_on_tick", "memory_x", &long]),
            RENAMED_PREFIX,
        )
        .unwrap();
        let expected_long = "proxy_on_".to_owned() + &"y".repeat(200);
        assert_eq!(
            renamed,
            module(&["proxy_on_tick", "memory_x", &expected_long])
        );
    }

    #[test]
    fn refuses_a_clash_and_a_truncated_module() {
        let clash = module(&["chronoguard_on_tick", "proxy_on_tick"]);
        assert!(rename_exports(&clash, RENAMED_PREFIX).is_err());
        let whole = module(&["chronoguard_on_tick"]);
        assert!(rename_exports(&whole[..whole.len() - 3], RENAMED_PREFIX).is_err());
    }
}
