//! `cargo xtask demo` and `cargo xtask bench`: prepare the environment, build the
//! filter, then hand the terminal over to a binary of the `integration-tests` crate.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{cargo, cargo_with_e2e_env, display, run};
use crate::{build_filter, setup};

/// Runs the interactive demo.
pub fn demo() -> Result<()> {
    prepare()?;
    let mut cmd = cargo_with_e2e_env();
    cmd.args([
        "run",
        "-q",
        "-p",
        "integration-tests",
        "--bin",
        "chronoguard-demo",
    ]);
    hand_over(cmd)
}

/// The request-path stages priced one by one against plain Envoy (`--stages`; see
/// `filter/wasm/src/http.rs`).
const STAGES: &[&str] = &["noop", "facts", "decide", "limit", "audit", "header"];

/// Runs the load benchmark, forwarding `args` to it (except `--only` and `--stages
/// all|none|a,b`).
pub fn bench(args: &[String]) -> Result<()> {
    let mut args = args.to_vec();
    // `--only audit`: the audit benchmark alone, the other args go to it; `--only filter`:
    // the filter benchmark alone; neither: the audit one (default args), then the filter one.
    match take_value(&mut args, "--only").as_deref() {
        Some("audit") => return audit_bench(&args),
        None => audit_bench(&[])?,
        Some("filter") => {}
        Some(other) => anyhow::bail!("--only takes `filter` or `audit`, not `{other}`"),
    }
    let stages: Vec<String> = match take_value(&mut args, "--stages").as_deref() {
        None | Some("all") => STAGES.iter().map(|s| (*s).to_owned()).collect(),
        Some("none") => Vec::new(),
        Some(list) => list.split(',').map(str::to_owned).collect(),
    };
    // `--compare name=module.wasm,...`: other modules (e.g. the previous commit's) measured
    // in the same run, before the stages.
    let mut built: Vec<String> = take_value(&mut args, "--compare")
        .map(|list| list.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    setup::setup()?;
    // Stage builds first: the real module, built last, is the one left in place.
    for stage in &stages {
        let path = build_filter::build_filter_stage(stage)?;
        built.push(format!("{stage}={}", path.display()));
    }
    prepare()?;
    let mut cmd = bench_binary("chronoguard-bench", cargo_with_e2e_env())?;
    cmd.env("CHRONOGUARD_BENCH_STAGES", built.join(","))
        .args(&args);
    hand_over(cmd)
}

/// Audit ingest, export and offline verification throughput against baselines measured
/// in the same run (`tests/src/bin/audit_bench.rs`); needs no filter build.
fn audit_bench(args: &[String]) -> Result<()> {
    setup::setup()?;
    let mut cmd = bench_binary("chronoguard-audit-bench", cargo())?;
    run(cmd.args(args))
}

/// `cmd` set up to run the benchmark binary `bin` of `integration-tests` (arguments go
/// after it) against an optimised control plane (built here): propagation and ingest
/// figures include the control plane's own work.
fn bench_binary(bin: &str, mut cmd: Command) -> Result<Command> {
    run(cargo().args([
        "build",
        "-q",
        "--profile",
        "bench-tools",
        "-p",
        "control-plane",
        "--bins",
    ]))?;
    cmd.env(
        "CHRONOGUARD_CONTROL_PLANE",
        crate::util::target_dir().join("bench-tools/chronoguard-control-plane"),
    );
    cmd.args([
        "run",
        "--profile",
        "bench-tools",
        "-q",
        "-p",
        "integration-tests",
        "--bin",
        bin,
        "--",
    ]);
    Ok(cmd)
}

/// Removes `flag VALUE` from `args`, returning the value.
fn take_value(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    let value = args.get(i + 1).cloned();
    args.drain(i..(i + 2).min(args.len()));
    value
}

fn prepare() -> Result<()> {
    setup::setup()?;
    build_filter::build_filter()?;
    run(cargo().args(["build", "-q", "-p", "control-plane", "--bins"]))?;
    Ok(())
}

/// Replaces this process with `cmd` (Unix `exec`; `cargo run` execs its binary too), so
/// the program is the terminal's foreground process: Ctrl-C reaches only it, it can shut
/// down cleanly, and its exit status is what the shell sees.
#[cfg(unix)]
fn hand_over(mut cmd: Command) -> Result<()> {
    use std::os::unix::process::CommandExt;

    let line = display(&cmd);
    println!("==> running `{line}`");
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to start `{line}`"))
}

/// Fallback without `exec`: wait for the child and forward its exit code.
#[cfg(not(unix))]
fn hand_over(mut cmd: Command) -> Result<()> {
    let line = display(&cmd);
    println!("==> running `{line}`");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => std::process::exit(code),
        None => anyhow::bail!("command `{line}` failed ({status})"),
    }
}
