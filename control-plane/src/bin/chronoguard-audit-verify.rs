//! `chronoguard-audit-verify`: verifies an audit export (JSONL from
//! `GET /api/v1/audit/export`) offline — no database, no server — against signed
//! checkpoints kept by the auditor and the published checkpoint public keys.
//!
//! Exit status: 0 the chain verifies, 1 it does not (the first bad sequence and the problem
//! are printed), 2 the input could not be read or the arguments are wrong.

use anyhow::{Context as _, bail};
use control_plane::audit::chain::{EntryCheck, EntryChecker, EntryFields, Verifier};
use control_plane::audit::checkpoint::{Checkpoint, PublicKey, TrustedKeys};
use control_plane::audit::signing::HmacKeyring;
use serde::Deserialize;
use std::borrow::Cow;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;
use uuid::Uuid;

const USAGE: &str = "usage: chronoguard-audit-verify --export FILE.jsonl
    [--checkpoints FILE.json]   checkpoints you kept (GET /api/v1/audit/checkpoints);
                                without it the checkpoints embedded in the export are used
    [--public-keys FILE.json]   checkpoint public keys (GET /api/v1/audit/public-key)
    [--public-key ID:HEX]...    a checkpoint public key given inline
    [--threads N]               threads hashing entries (default: the CPUs available)

HMAC keys (optional, `key_id:hex_secret,...`) are read from the environment variable
CHRONOGUARD_AUDIT_HMAC_KEYS, never from the command line. Without them entry signatures
are not checked (the chain and the checkpoints still are).";

#[derive(Default)]
struct Args {
    export: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
    public_key_files: Vec<PathBuf>,
    public_keys: Vec<String>,
    threads: Option<usize>,
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
            "--threads" => {
                let n: usize = value()?.parse().context("--threads needs a number")?;
                args.threads = Some(n.max(1));
            }
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
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let checker = verifier.checker();
    verify_records(&export, threads, &checker, |item| {
        if item.tenant_id != tenant {
            bail!("the export mixes tenants ({} and {tenant})", item.tenant_id);
        }
        if let (true, Some(checkpoint)) = (embedded, &item.checkpoint) {
            if trusted.is_empty() {
                bail!("the export carries checkpoints: pass --public-keys or --public-key");
            }
            verifier.add_checkpoint(checkpoint, &trusted);
        }
        verifier.push_checked(&item.check);
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

/// One export line as parsed for verification: strings borrowed from the line (copied
/// only when JSON escapes must be undone), ids and numbers decoded in place.
#[derive(Deserialize)]
struct Line<'a> {
    tenant_id: Uuid,
    sequence_number: i64,
    entry_id: Uuid,
    timestamp_ns: i64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    agent_id: Option<Uuid>,
    #[serde(borrow)]
    agent_fingerprint: Cow<'a, str>,
    #[serde(borrow)]
    agent_subject: Cow<'a, str>,
    #[serde(borrow)]
    domain: Cow<'a, str>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    path: Cow<'a, str>,
    #[serde(borrow)]
    user_agent: Cow<'a, str>,
    #[serde(borrow)]
    source_ip: Cow<'a, str>,
    #[serde(borrow)]
    decision: Cow<'a, str>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
    #[serde(borrow)]
    policy_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    config_version: Cow<'a, str>,
    #[serde(borrow)]
    previous_hash: Cow<'a, str>,
    #[serde(borrow)]
    current_hash: Cow<'a, str>,
    #[serde(borrow)]
    signature_key_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    signature: Option<Cow<'a, str>>,
    checkpoint: Option<Checkpoint>,
}

/// A position in one line, for [`Line::fast`].
struct Cursor<'a> {
    /// The line, UTF-8 validated once as a whole.
    text: &'a str,
    s: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, lit: &[u8]) -> Option<()> {
        let rest = self.s.get(self.at..)?;
        rest.starts_with(lit).then(|| self.at += lit.len())
    }

    /// `"name":`, preceded by a comma unless it is the first key.
    fn key(&mut self, name: &[u8]) -> Option<()> {
        if self.at > 1 {
            self.lit(b",")?;
        }
        self.lit(b"\"")?;
        self.lit(name)?;
        self.lit(b"\":")
    }

    /// A string without escapes (else `None`); the line has no control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.lit(b"\"")?;
        let rest = self.s.get(self.at..)?;
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        (rest[end] == b'"').then_some(())?;
        let start = self.at;
        self.at += end + 1;
        // Both ends are at ASCII quotes, so on character boundaries.
        self.text.get(start..start + end)
    }

    fn text(&mut self, name: &[u8]) -> Option<&'a str> {
        self.key(name)?;
        self.string()
    }

    /// `null` or a string.
    fn nullable(&mut self) -> Option<Option<&'a str>> {
        if self.lit(b"null").is_some() {
            return Some(None);
        }
        self.string().map(Some)
    }

    fn uuid(&mut self, name: &[u8]) -> Option<Uuid> {
        Uuid::parse_str(self.text(name)?).ok()
    }

    /// An integer as JSON writes it: optional minus, no leading zeros.
    fn int(&mut self, name: &[u8]) -> Option<i64> {
        self.key(name)?;
        let rest = self.s.get(self.at..)?;
        let negative = rest.first() == Some(&b'-');
        let digits = &rest[usize::from(negative)..];
        let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 || (len > 1 && digits[0] == b'0') || len > 19 {
            return None;
        }
        let mut value: i64 = 0;
        for d in &digits[..len] {
            value = value.checked_mul(10)?;
            value = if negative {
                value.checked_sub(i64::from(d - b'0'))?
            } else {
                value.checked_add(i64::from(d - b'0'))?
            };
        }
        // A fraction or exponent is not an integer here: leave it to serde_json.
        if matches!(digits.get(len), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at += usize::from(negative) + len;
        Some(value)
    }
}

/// What the in-order pass needs of one record.
struct Item {
    tenant_id: Uuid,
    check: EntryCheck,
    checkpoint: Option<Checkpoint>,
}

impl<'a> Line<'a> {
    /// The export's own layout (the fields in `ExportRecord`'s order, no whitespace, no
    /// escapes, no checkpoint), read without a general JSON parser; `None` for anything else,
    /// which `serde_json` then parses (or rejects). Decodes exactly what `serde_json` would.
    fn fast(line: &'a [u8]) -> Option<Self> {
        // Trailing whitespace (the newline) aside, a line of ours has no control
        // characters at all (JSON escapes them in strings): checked once, here.
        let end = line.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
        let line = &line[..end];
        if line.iter().fold(false, |bad, b| bad | (*b < 0x20)) {
            return None;
        }
        let text = std::str::from_utf8(line).ok()?;
        let mut c = Cursor {
            text,
            s: line,
            at: 0,
        };
        c.lit(b"{")?;
        let tenant_id = c.uuid(b"tenant_id")?;
        let sequence_number = c.int(b"sequence_number")?;
        let entry_id = c.uuid(b"entry_id")?;
        let timestamp_ns = c.int(b"timestamp_ns")?;
        let kind = c.text(b"kind")?;
        c.key(b"agent_id")?;
        let agent_id = match c.nullable()? {
            Some(text) => Some(Uuid::parse_str(text).ok()?),
            None => None,
        };
        let mut texts = [""; 9];
        for (slot, name) in texts.iter_mut().zip([
            &b"agent_fingerprint"[..],
            b"agent_subject",
            b"domain",
            b"method",
            b"path",
            b"user_agent",
            b"source_ip",
            b"decision",
            b"reason",
        ]) {
            *slot = c.text(name)?;
        }
        c.key(b"policy_id")?;
        let policy_id = c.nullable()?;
        let config_version = c.text(b"config_version")?;
        let previous_hash = c.text(b"previous_hash")?;
        let current_hash = c.text(b"current_hash")?;
        c.key(b"signature_key_id")?;
        let signature_key_id = c.nullable()?;
        c.key(b"signature")?;
        let signature = c.nullable()?;
        c.key(b"checkpoint")?;
        c.lit(b"null}")?;
        (c.at == line.len()).then_some(())?;
        let [
            fingerprint,
            subject,
            domain,
            method,
            path,
            user_agent,
            source_ip,
            decision,
            reason,
        ] = texts.map(Cow::Borrowed);
        Some(Line {
            tenant_id,
            sequence_number,
            entry_id,
            timestamp_ns,
            kind: Cow::Borrowed(kind),
            agent_id,
            agent_fingerprint: fingerprint,
            agent_subject: subject,
            domain,
            method,
            path,
            user_agent,
            source_ip,
            decision,
            reason,
            policy_id: policy_id.map(Cow::Borrowed),
            config_version: Cow::Borrowed(config_version),
            previous_hash: Cow::Borrowed(previous_hash),
            current_hash: Cow::Borrowed(current_hash),
            signature_key_id: signature_key_id.map(Cow::Borrowed),
            signature: signature.map(Cow::Borrowed),
            checkpoint: None,
        })
    }

    fn check(&self, checker: &EntryChecker, scratch: &mut Vec<u8>) -> EntryCheck {
        let fields = EntryFields {
            tenant_id: self.tenant_id,
            sequence_number: self.sequence_number,
            entry_id: self.entry_id,
            timestamp_ns: self.timestamp_ns,
            kind: &self.kind,
            agent_id: self.agent_id,
            agent_fingerprint: &self.agent_fingerprint,
            agent_subject: &self.agent_subject,
            domain: &self.domain,
            method: &self.method,
            path: &self.path,
            user_agent: &self.user_agent,
            source_ip: &self.source_ip,
            decision: &self.decision,
            reason: &self.reason,
            policy_id: self.policy_id.as_deref(),
            config_version: &self.config_version,
        };
        // Half a signature is no signature; verification reports it as missing.
        let signature = match (&self.signature_key_id, &self.signature) {
            (Some(key_id), Some(mac)) => Some((key_id.as_ref(), mac.as_ref())),
            _ => None,
        };
        checker.check(
            &fields,
            &self.previous_hash,
            &self.current_hash,
            signature,
            scratch,
        )
    }
}

/// Bytes read per step; each step's lines are split between the threads.
const BLOCK: usize = 8 << 20;

/// What one thread made of its share of a block: the checked records in order, how many
/// lines it covered, and the first line it could not parse (index within its share).
struct Share {
    items: Vec<Item>,
    lines: u64,
    error: Option<(u64, serde_json::Error)>,
}

/// Streams the JSONL file in blocks. Every record is parsed and checked on its own
/// (hash, HMAC) by `threads` threads; `visit` then gets the records in file order, where
/// the cheap in-order checks (sequence, links, pins) happen. While the threads work on a
/// block, this thread reads the next one. Memory: two blocks and their records.
fn verify_records(
    path: &PathBuf,
    threads: usize,
    checker: &EntryChecker,
    mut visit: impl FnMut(&Item) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let read_error =
        |e: std::io::Error| anyhow::Error::new(e).context(format!("reading {}", path.display()));
    // `block` holds whole lines; `carry` the partial line after them.
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK + 4096);
    let mut next: Vec<u8> = Vec::with_capacity(BLOCK + 4096);
    let mut eof = fill(&mut file, &mut block, &mut Vec::new()).map_err(read_error)?;
    let mut carry = split_tail(&mut block, eof);
    let mut line_number = 0u64;
    loop {
        let parts = split_lines(&block, threads);
        let (shares, read) = std::thread::scope(|scope| {
            let workers: Vec<_> = parts
                .iter()
                .map(|part| scope.spawn(|| check_share(part, checker)))
                .collect();
            let read = if eof {
                Ok(true)
            } else {
                next.clear();
                fill(&mut file, &mut next, &mut carry)
            };
            let shares: Vec<std::thread::Result<Share>> =
                workers.into_iter().map(|w| w.join()).collect();
            (shares, read)
        });
        for share in shares {
            let share = share.map_err(|_| anyhow::anyhow!("a verification thread panicked"))?;
            share.items.iter().try_for_each(&mut visit)?;
            if let Some((index, err)) = share.error {
                let at = line_number + index + 1;
                return Err(anyhow::Error::new(err))
                    .with_context(|| format!("{}:{at}: not an audit record", path.display()));
            }
            line_number += share.lines;
        }
        if eof {
            return Ok(());
        }
        eof = read.map_err(read_error)?;
        std::mem::swap(&mut block, &mut next);
        carry = split_tail(&mut block, eof);
    }
}

/// Appends `carry`, then reads (at least once) until `buf` holds about a block; true at
/// end of file.
fn fill(file: &mut std::fs::File, buf: &mut Vec<u8>, carry: &mut Vec<u8>) -> std::io::Result<bool> {
    use std::io::Read as _;
    buf.append(carry);
    loop {
        let want = BLOCK.saturating_sub(buf.len()).max(64 << 10) as u64;
        // `read_to_end` reads into spare capacity without zeroing it first.
        let n = file.by_ref().take(want).read_to_end(buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf.len() >= BLOCK {
            return Ok(false);
        }
    }
}

/// Moves the bytes after the last newline out of `block` (nothing at end of file, where
/// a last line may lack its newline).
fn split_tail(block: &mut Vec<u8>, eof: bool) -> Vec<u8> {
    if eof {
        return Vec::new();
    }
    match memchr::memrchr(b'\n', block) {
        Some(end) => block.split_off(end + 1),
        None => std::mem::take(block),
    }
}

/// Splits whole lines into about `n` parts of similar size.
fn split_lines(block: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = block;
    for i in (1..=n).rev() {
        if i == 1 || rest.is_empty() {
            parts.push(rest);
            break;
        }
        let target = rest.len() / i;
        let cut = memchr::memchr(b'\n', &rest[target..]).map_or(rest.len(), |p| target + p + 1);
        let (part, tail) = rest.split_at(cut);
        parts.push(part);
        rest = tail;
    }
    parts
}

fn check_share(part: &[u8], checker: &EntryChecker) -> Share {
    let mut share = Share {
        items: Vec::with_capacity(part.len() / 512 + 1),
        lines: 0,
        error: None,
    };
    let mut scratch = Vec::with_capacity(1024);
    let mut rest = part;
    let mut index = 0u64;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        index += 1;
        share.lines += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match Line::fast(line) {
            Some(record) => Ok(record),
            None => serde_json::from_slice::<Line<'_>>(line),
        };
        match parsed {
            Ok(record) => share.items.push(Item {
                tenant_id: record.tenant_id,
                check: record.check(checker, &mut scratch),
                checkpoint: record.checkpoint,
            }),
            Err(err) => {
                share.error = Some((index - 1, err));
                break;
            }
        }
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_plane::audit::chain::{ChainEntry, GENESIS, append};
    use control_plane::audit::export::ExportRecord;

    fn lines(subject: &str, policy: Option<&str>, keys: &HmacKeyring) -> Vec<String> {
        let entries = (1..=3)
            .map(|seq| ChainEntry {
                tenant_id: Uuid::from_u128(1),
                sequence_number: seq,
                entry_id: Uuid::from_u128(100 + seq as u128),
                timestamp_ns: 1_700_000_000_000_000_000 + seq,
                kind: "decision".into(),
                agent_id: (seq % 2 == 0).then(|| Uuid::from_u128(5)),
                agent_fingerprint: "ab".into(),
                agent_subject: subject.into(),
                domain: "example.com".into(),
                method: "GET".into(),
                path: "/ä".into(),
                user_agent: String::new(),
                source_ip: "127.0.0.1".into(),
                decision: "allow".into(),
                reason: "domain_allowed".into(),
                policy_id: policy.map(str::to_owned),
                config_version: "1".into(),
            })
            .collect();
        append(GENESIS, entries, keys)
            .0
            .into_iter()
            .map(|stored| ExportRecord::new(stored, None).to_jsonl())
            .collect()
    }

    /// The fast path reads our own lines exactly as `serde_json` does, and declines
    /// anything it does not handle (escapes here) instead of misreading it.
    #[test]
    fn fast_path_agrees_with_serde_json() {
        let keys = HmacKeyring::parse(&format!("k1:{}", "11".repeat(32)), "k1").unwrap();
        let checker = Verifier::new().with_keys(keys.clone()).checker();
        for signing in [&keys, &HmacKeyring::empty()] {
            for policy in [Some("p"), None] {
                for line in lines("CN=a", policy, signing) {
                    let fast = Line::fast(line.as_bytes()).expect("fast path");
                    let slow: Line<'_> = serde_json::from_str(&line).unwrap();
                    let mut scratch = Vec::new();
                    assert_eq!(
                        fast.check(&checker, &mut scratch),
                        slow.check(&checker, &mut scratch)
                    );
                    assert_eq!(
                        (fast.tenant_id, fast.agent_id, fast.policy_id.as_deref()),
                        (slow.tenant_id, slow.agent_id, slow.policy_id.as_deref())
                    );
                }
            }
        }
        for line in lines("CN=\"quoted\"", Some("p"), &keys) {
            assert!(Line::fast(line.as_bytes()).is_none());
            assert!(serde_json::from_str::<Line<'_>>(&line).is_ok());
        }
        assert!(Line::fast(b"{\"tenant_id\": 1}").is_none());
    }
}
