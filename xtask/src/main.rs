//! `cargo xtask`: developer automation for the ChronoGuard workspace.
//!
//! Run `cargo xtask help` for the list of commands. Only `anyhow` and std are used so
//! that this crate builds in seconds even on a fresh checkout.

mod build_filter;
mod ci;
mod run;
mod setup;
mod tidy;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup          install/verify the toolchain: wasm32-wasip1 target, postgres 15, redis,
                 binaryen (wasm-opt), wrk, and envoy 1.40 in target/tools (idempotent)
  build-filter [--stage S | --names]
                 build filter-wasm for wasm32-wasip1 and optimise it into
                 target/filter/chronoguard.wasm
  ci             setup, fmt check, clippy (host + wasm), unit tests, build-filter and
                 the end-to-end tests, with per-step timings
  demo           setup + build-filter, then run the interactive chronoguard-demo
  bench [args]   setup + build-filter (+ stage builds, --stages all|none|a,b), then run
                 chronoguard-bench (other args are forwarded); --compare name=module.wasm,...
                 measures other modules (e.g. a previous commit's) in the same run
                 --only audit: chronoguard-audit-bench alone (args forwarded); --only filter:
                 the filter bench alone; default: the audit bench, then the filter bench
  tidy           check that every .rs file starts with a `//!` doc comment
  help           show this text
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_deref() {
        None | Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("setup") => no_args("setup", &rest).and_then(|()| setup::setup()),
        Some("build-filter") => match rest.as_slice() {
            [] => build_filter::build_filter().map(|_| ()),
            [flag, stage] if flag == "--stage" => {
                build_filter::build_filter_stage(stage).map(|_| ())
            }
            [flag] if flag == "--names" => build_filter::build_filter_named().map(|_| ()),
            _ => Err(anyhow::anyhow!(
                "usage: cargo xtask build-filter [--stage STAGE | --names]"
            )),
        },
        Some("ci") => no_args("ci", &rest).and_then(|()| ci::ci()),
        Some("demo") => no_args("demo", &rest).and_then(|()| run::demo()),
        Some("bench") => run::bench(&rest),
        Some("tidy") => no_args("tidy", &rest).and_then(|()| tidy::tidy()),
        Some(other) => {
            eprint!("error: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn no_args(cmd: &str, rest: &[String]) -> anyhow::Result<()> {
    if rest.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("`{cmd}` takes no arguments, got: {}", rest.join(" "))
    }
}
