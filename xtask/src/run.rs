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

/// Runs the load benchmark, forwarding `args` to it.
pub fn bench(args: &[String]) -> Result<()> {
    prepare()?;
    // The control plane runs optimised too: propagation figures include its bundle
    // compile and validation.
    run(cargo().args([
        "build",
        "-q",
        "--profile",
        "bench-tools",
        "-p",
        "control-plane",
        "--bins",
    ]))?;
    let mut cmd = cargo_with_e2e_env();
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
        "chronoguard-bench",
        "--",
    ])
    .args(args);
    hand_over(cmd)
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
