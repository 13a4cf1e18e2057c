//! `cargo xtask ci`: the full pipeline, in order, with the elapsed time of every step.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::util::{cargo, cargo_with_e2e_env, run};
use crate::{build_filter, setup};

/// Runs every CI step, stopping at the first failure.
pub fn ci() -> Result<()> {
    let start = Instant::now();
    step("setup", setup::setup)?;
    step("fmt", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("clippy-wasm", || {
        run(cargo().args([
            "clippy",
            "-p",
            "filter-core",
            "-p",
            "filter-wasm",
            "--target",
            "wasm32-wasip1",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("unit-tests", || {
        run(cargo().args(["test", "--workspace", "--exclude", "integration-tests"]))
    })?;
    step("build-filter", || build_filter::build_filter().map(|_| ()))?;
    step("build-control-plane", || {
        run(cargo().args(["build", "-p", "control-plane", "--bins"]))
    })?;
    step("openapi", || {
        // The document the control plane serves, validated by an independent OpenAPI 3.1
        // validator.
        let doc = crate::util::target_dir().join("openapi.json");
        let json = crate::util::capture(
            std::process::Command::new(
                crate::util::target_dir().join("debug/chronoguard-control-plane"),
            )
            .arg("--print-openapi"),
        )?;
        std::fs::write(&doc, json)?;
        run(std::process::Command::new(setup::openapi_validator()).arg(&doc))
    })?;
    step("e2e-tests", || {
        run(cargo_with_e2e_env().args([
            "test",
            "-p",
            "integration-tests",
            "--",
            "--test-threads",
            "2",
        ]))
    })?;
    println!("==> ci ok (total {:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> step {name}");
    let start = Instant::now();
    let result = f();
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("==> step {name} ok ({secs:.1} s)");
            Ok(())
        }
        Err(err) => {
            println!("==> step {name} FAILED ({secs:.1} s)");
            Err(err).with_context(|| format!("ci step `{name}` failed"))
        }
    }
}
