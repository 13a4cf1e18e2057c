//! `chronoguard-audit-verify`: verifies an audit export (JSONL from
//! `GET /api/v1/audit/export`) offline — no database, no server — against signed
//! checkpoints kept by the auditor and the published checkpoint public keys.
//!
//! Exit status: 0 the chain verifies, 1 it does not (the first bad sequence and the problem
//! are printed), 2 the input could not be read or the arguments are wrong.

use anyhow::{Context as _, bail};
use control_plane::audit::chain::Verifier;
use control_plane::audit::checkpoint::{Checkpoint, PublicKey, TrustedKeys};
use control_plane::audit::export::ExportRecord;
use control_plane::audit::signing::HmacKeyring;
use serde::Deserialize;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;
use uuid::Uuid;

const USAGE: &str = "usage: chronoguard-audit-verify --export FILE.jsonl
    [--checkpoints FILE.json]   checkpoints you kept (GET /api/v1/audit/checkpoints);
                                without it the checkpoints embedded in the export are used
    [--public-keys FILE.json]   checkpoint public keys (GET /api/v1/audit/public-key)
    [--public-key ID:HEX]...    a checkpoint public key given inline

HMAC keys (optional, `key_id:hex_secret,...`) are read from the environment variable
CHRONOGUARD_AUDIT_HMAC_KEYS, never from the command line. Without them entry signatures
are not checked (the chain and the checkpoints still are).";

#[derive(Default)]
struct Args {
    export: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
    public_key_files: Vec<PathBuf>,
    public_keys: Vec<String>,
}

/// `GET /api/v1/audit/checkpoints` body, or a bare array.
#[derive(Deserialize)]
#[serde(untagged)]
enum CheckpointsFile {
    Listing { checkpoints: Vec<Checkpoint> },
    Bare(Vec<Checkpoint>),
}

/// `GET /api/v1/audit/public-key` body, or a bare array.
#[derive(Deserialize)]
#[serde(untagged)]
enum PublicKeysFile {
    Listing { keys: Vec<PublicKey> },
    Bare(Vec<PublicKey>),
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--export" => args.export = Some(value()?.into()),
            "--checkpoints" => args.checkpoints = Some(value()?.into()),
            "--public-keys" => args.public_key_files.push(value()?.into()),
            "--public-key" => args.public_keys.push(value()?),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n\n{USAGE}"),
        }
    }
    Ok(args)
}

fn run() -> anyhow::Result<bool> {
    let args = parse_args()?;
    let export = args.export.clone().context("--export is required")?;

    let mut trusted = TrustedKeys::default();
    for path in &args.public_key_files {
        let keys: PublicKeysFile = read_json(path)?;
        let keys = match keys {
            PublicKeysFile::Listing { keys } | PublicKeysFile::Bare(keys) => keys,
        };
        for key in keys {
            trusted.insert(key)?;
        }
    }
    let inline = args.public_keys.join(",");
    for key in TrustedKeys::from_settings(None, &inline)?.public_keys() {
        trusted.insert(key)?;
    }
    let hmac = match std::env::var("CHRONOGUARD_AUDIT_HMAC_KEYS") {
        // Verification only: any listed key id may be the "active" one.
        Ok(spec) if !spec.trim().is_empty() => {
            let first = spec
                .split(',')
                .next()
                .and_then(|k| k.split_once(':'))
                .map(|(id, _)| id.trim().to_owned())
                .unwrap_or_default();
            HmacKeyring::parse(&spec, &first).context("CHRONOGUARD_AUDIT_HMAC_KEYS")?
        }
        _ => HmacKeyring::empty(),
    };
    let kept: Option<Vec<Checkpoint>> = match &args.checkpoints {
        Some(path) => Some(match read_json::<CheckpointsFile>(path)? {
            CheckpointsFile::Listing { checkpoints } | CheckpointsFile::Bare(checkpoints) => {
                checkpoints
            }
        }),
        None => None,
    };

    // One streaming pass. The first record names the tenant and where the export starts.
    let first = first_record(&export)?;
    let tenant = match (&first, &kept) {
        (Some(head), _) => head.tenant_id,
        (None, Some(kept)) => kept.first().map_or(Uuid::nil(), |cp| cp.tenant_id),
        (None, None) => Uuid::nil(),
    };
    let source = if kept.is_some() {
        "checkpoints file"
    } else {
        "export (embedded)"
    };
    let checkpoints: Vec<Checkpoint> = kept
        .iter()
        .flatten()
        .filter(|cp| cp.tenant_id == tenant)
        .cloned()
        .collect();
    if !checkpoints.is_empty() && trusted.is_empty() {
        bail!("checkpoints need a public key: pass --public-keys or --public-key");
    }

    // An export that starts later (older entries dropped by retention) must be anchored
    // by a signed checkpoint right before its first entry, from the auditor's own copy.
    let (start, anchored_at) = match first.as_ref().map(|h| h.sequence_number) {
        Some(first) if first > 1 => {
            let anchor = checkpoints
                .iter()
                .find(|cp| cp.sequence_number == first - 1)
                .and_then(|cp| Verifier::after_checkpoint(cp, &trusted))
                .with_context(|| {
                    format!(
                        "the export starts at sequence {first}; pass --checkpoints holding a valid checkpoint at {}",
                        first - 1
                    )
                })?;
            (anchor, Some(first - 1))
        }
        _ => (Verifier::new(), None),
    };
    let embedded = kept.is_none();
    let started = std::time::Instant::now();
    let mut verifier = start
        .with_keys(hmac)
        .with_checkpoints(&checkpoints, &trusted);
    for_each_record(&export, |record: ExportRecord| {
        if record.tenant_id != tenant {
            bail!(
                "the export mixes tenants ({} and {tenant})",
                record.tenant_id
            );
        }
        let (entry, checkpoint) = record.into_parts();
        if let (true, Some(checkpoint)) = (embedded, checkpoint) {
            if trusted.is_empty() {
                bail!("the export carries checkpoints: pass --public-keys or --public-key");
            }
            verifier.add_checkpoint(&checkpoint, &trusted);
        }
        verifier.push(&entry);
        Ok(())
    })?;
    let outcome = verifier.finish(None);
    let elapsed = started.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "tenant_id": tenant,
            "checkpoints_from": source,
            "anchored_at_checkpoint": anchored_at,
            "outcome": outcome,
        })
    );
    let rate = outcome.entries_checked as f64 / elapsed.as_secs_f64().max(1e-9);
    match (outcome.ok, outcome.problem, outcome.first_bad_sequence) {
        (true, _, _) => eprintln!(
            "ok: {} entries, {} checkpoints matched, {} signatures checked ({rate:.0} entries/s)",
            outcome.entries_checked, outcome.checkpoints_matched, outcome.signatures_checked
        ),
        (false, problem, seq) => eprintln!(
            "FAILED at sequence {}: {:?}",
            seq.map_or("?".into(), |s| s.to_string()),
            problem
        ),
    }
    Ok(outcome.ok)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// What is needed of the first record before verification starts.
#[derive(Deserialize)]
struct Head {
    tenant_id: Uuid,
    sequence_number: i64,
}

/// The first record's tenant and sequence (the rest of it is skipped, not decoded).
fn first_record(path: &PathBuf) -> anyhow::Result<Option<Head>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    while reader
        .read_line(&mut line)
        .with_context(|| format!("reading {}", path.display()))?
        > 0
    {
        if !line.trim().is_empty() {
            let head = serde_json::from_str(&line).with_context(|| {
                format!("{}: the first line is not an audit record", path.display())
            })?;
            return Ok(Some(head));
        }
        line.clear();
    }
    Ok(None)
}

/// Streams the JSONL file record by record through one reused line buffer.
fn for_each_record<T: serde::de::DeserializeOwned>(
    path: &PathBuf,
    mut visit: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = String::with_capacity(4096);
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: T = serde_json::from_str(&line)
            .with_context(|| format!("{}:{number}: not an audit record", path.display()))?;
        visit(record)?;
    }
}
