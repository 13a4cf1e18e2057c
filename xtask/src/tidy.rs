//! `cargo xtask tidy`: repository hygiene checks. Currently: every Rust source file
//! starts with a `//!` module doc comment.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::workspace_root;

/// Top-level directories whose `.rs` files are checked.
const ROOTS: &[&str] = &["filter", "control-plane", "tests", "xtask"];

/// Fails listing every `.rs` file whose first line is not a `//!` comment.
pub fn tidy() -> Result<()> {
    println!("==> checking that every .rs file starts with a `//!` doc comment");
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ROOTS {
        collect_rs(&root.join(dir), &mut files)?;
    }
    files.sort();

    let mut offenders = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let first = text
            .trim_start_matches('\u{feff}')
            .lines()
            .next()
            .unwrap_or("");
        if !first.starts_with("//!") {
            offenders.push(file.strip_prefix(&root).unwrap_or(file).to_path_buf());
        }
    }

    if offenders.is_empty() {
        println!("==> tidy ok ({} files)", files.len());
        return Ok(());
    }
    for file in &offenders {
        println!("    missing `//!` on line 1: {}", file.display());
    }
    bail!(
        "{} of {} .rs files do not start with a `//!` doc comment",
        offenders.len(),
        files.len()
    )
}

/// Recursively collects `.rs` files under `dir`, skipping `target` and hidden directories.
fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if kind.is_dir() {
            if name != "target" && !name.starts_with('.') {
                collect_rs(&path, out)?;
            }
        } else if kind.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}
