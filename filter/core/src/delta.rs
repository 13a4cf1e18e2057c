//! Pushes as changes: a configuration may carry only the agents and policies that changed
//! since a `base` version the receiving VM holds (`docs/contracts.md`, "Deltas").
//!
//! Every push costs each Envoy worker what Envoy does with the whole configuration
//! (proxy-wasm-cpp-host keys each plugin by a string holding it, and copies it into the
//! VM) besides the filter's `on_configure` (BENCHMARKS.md, "Nineteenth session"). A
//! domain edit changes one policy of a 430 KB configuration, so the control plane sends
//! what changed against the version it last sent on that stream ([`delta`]), and each VM
//! applies it to the entries it kept of that version ([`Retained`]). A VM that does not
//! hold the base (Envoy's canary, a fresh VM per push) reads the entries the previous
//! canary published in shared data ([`Retained::encode`]); without them the VM refuses
//! the delta, Envoy NACKs it, and the control plane sends the full configuration.

use crate::config::{
    AuditSink, ConfigError, Mode, RawBundle, RawData, RawEntry, RawPluginConfig, Reader, RegoModule,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

/// An entry's JSON text and its hash, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    text: Box<[u8]>,
    hash: u64,
}

/// Keys with their new entries.
type SectionChanges = Vec<(Box<str>, Kept)>;

/// An entry seen in place: its key, the hash of its text, and its text.
type Entry<'a> = (&'a str, u64, &'a [u8]);

/// Where an entry sits in [`Retained`]'s buffer: its key, its text, and its whole record
/// in the shared form (lengths, key, hash and text).
#[derive(Debug, Clone)]
struct Span {
    key: Range<usize>,
    hash: u64,
    text: Range<usize>,
    record: Range<usize>,
}

/// The agents or the policies of a [`Retained`]: the entries of its buffer, and those a
/// delta added or replaced since the buffer was written.
#[derive(Debug, Clone, Default)]
struct Section {
    /// Sorted by key, each key once.
    base: Vec<Span>,
    /// Each hides `base`'s entry with the same key.
    overlay: BTreeMap<Box<str>, Kept>,
}

/// The agents and policies of the configuration a VM accepted last: the base the next
/// delta applies to.
///
/// They are kept in their shared form ([`Retained::encode`]), one buffer with the keys and
/// texts, and a delta's changes beside it until they outgrow a quarter of it. A canary
/// (a fresh VM per push, on Envoy's main thread) reads the previous canary's entries
/// without an allocation per entry, and a long-lived VM applies a delta without copying
/// the buffer (BENCHMARKS.md, "Twenty-first session").
#[derive(Debug, Clone)]
pub struct Retained {
    version: String,
    modules: Vec<RegoModule>,
    /// The names of the configuration's timezones (its offset tables), sorted.
    timezones: Vec<String>,
    /// The shared form the base entries were read from (their keys checked as UTF-8).
    buf: Vec<u8>,
    agents: Section,
    policies: Section,
}

/// Changes a VM keeps beside its buffer before writing them into it, whatever its size.
const OVERLAY_MIN: usize = 64;

/// A delta's changes, owned: applied to the [`Retained`] it was merged with once its
/// configuration is accepted.
#[derive(Debug)]
pub struct Changes {
    version: String,
    /// New modules; `None`: the base's.
    modules: Option<Vec<RegoModule>>,
    /// A delta carries all the timezones.
    timezones: Vec<String>,
    agents: SectionChanges,
    policies: SectionChanges,
}

// === impl Retained ===

impl Retained {
    /// The entries of a full configuration with a bundle (of two entries with one key,
    /// the later one, as for the filter's own lookups).
    pub fn keep(config: &RawPluginConfig<'_>) -> Option<Self> {
        if config.base.is_some() {
            return None;
        }
        let bundle = config.bundle.as_ref()?;
        let (agents, policies) = (sorted(&bundle.data.agents), sorted(&bundle.data.policies));
        let timezones = timezone_names(bundle.data.timezones.as_ref());
        Self::decode(write_form(
            &config.version,
            &bundle.modules,
            &timezones,
            [&agents, &policies],
        ))
    }

    /// The version these entries are of.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether a delta to `version` against `base` applies to these entries: they are
    /// `base`'s, or already `version`'s (a delta only adds and replaces entries, so
    /// applying it again changes nothing).
    pub fn serves(&self, base: &str, version: &str) -> bool {
        self.version == base || self.version == version
    }

    /// The Rego modules.
    pub fn modules(&self) -> &[RegoModule] {
        &self.modules
    }

    /// The names of the timezones the configuration has offset tables for, sorted.
    pub fn timezones(&self) -> &[String] {
        &self.timezones
    }

    /// The policies' keys and the hashes of their texts, in key order.
    pub fn policies(&self) -> impl Iterator<Item = (&str, u64)> {
        self.policies
            .entries(self)
            .into_iter()
            .map(|(key, hash, _)| (key, hash))
    }

    /// The hashes of the agents' and of the policies' texts, and of those the changes
    /// beside the buffer replaced (until they are written into it): a superset, found
    /// without reading a key.
    pub fn hashes(&self) -> (Vec<u64>, Vec<u64>) {
        let hashes = |s: &Section| {
            let base = s.base.iter().map(|span| span.hash);
            base.chain(s.overlay.values().map(|e| e.hash)).collect()
        };
        (hashes(&self.agents), hashes(&self.policies))
    }

    /// The bundle of these entries, with `timezones` (a delta's, which carries them all).
    pub fn bundle(&self, timezones: Option<serde_json::Value>) -> RawBundle<'_> {
        RawBundle {
            modules: self.modules.clone(),
            data: RawData {
                agents: raw(self.agents.entries(self)),
                policies: raw(self.policies.entries(self)),
                timezones,
            },
        }
    }

    /// The shared form, for the next canary: lengths, keys, hashes and texts, read back
    /// without parsing JSON ([`Retained::decode`]). The buffer's records between two
    /// changes are copied in one piece.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + self.changes_size() + 64);
        put_header(&mut out, &self.version, &self.modules, &self.timezones);
        self.agents.write(&self.buf, &mut out);
        self.policies.write(&self.buf, &mut out);
        out
    }

    /// The bytes of the changes beside the buffer, about.
    fn changes_size(&self) -> usize {
        [&self.agents, &self.policies]
            .iter()
            .flat_map(|s| s.overlay.iter())
            .map(|(key, e)| key.len() + e.text.len() + 16)
            .sum()
    }

    /// Reads the shared form, keeping `bytes` as the buffer its entries point into;
    /// `None` for anything else (keys out of order among them).
    pub fn decode(bytes: Vec<u8>) -> Option<Self> {
        fn take<'b>(r: &mut Reader<'b>) -> Option<&'b [u8]> {
            let n = r.u32()? as usize;
            r.take(n)
        }
        fn text<'b>(r: &mut Reader<'b>) -> Option<&'b str> {
            std::str::from_utf8(take(r)?).ok()
        }
        let (version, modules, timezones, agents, policies) = {
            let mut r = Reader(&bytes);
            let version = text(&mut r)?.to_owned();
            let modules = (0..r.u32()?)
                .map(|_| {
                    Some(RegoModule {
                        name: text(&mut r)?.to_owned(),
                        source: text(&mut r)?.to_owned(),
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let timezones = (0..r.u32()?)
                .map(|_| Some(text(&mut r)?.to_owned()))
                .collect::<Option<Vec<_>>>()?;
            let mut section = || -> Option<Section> {
                let n = r.u32()? as usize;
                // A span per 16 bytes at most: a forged count allocates no more than that.
                let mut base = Vec::with_capacity(n.min(r.0.len() / 16));
                let mut previous: Option<&str> = None;
                for _ in 0..n {
                    let record = bytes.len() - r.0.len();
                    let key = text(&mut r)?;
                    if previous.is_some_and(|p| p >= key) {
                        return None;
                    }
                    previous = Some(key);
                    let hash = r.u64()?;
                    let text_at = bytes.len() - r.0.len() + 4;
                    let text = take(&mut r)?;
                    let end = text_at + text.len();
                    base.push(Span {
                        key: record + 4..record + 4 + key.len(),
                        hash,
                        text: text_at..end,
                        record: record..end,
                    });
                }
                Some(Section {
                    base,
                    overlay: BTreeMap::new(),
                })
            };
            let agents = section()?;
            let policies = section()?;
            if !r.0.is_empty() {
                return None;
            }
            (version, modules, timezones, agents, policies)
        };
        Some(Self {
            version,
            modules,
            timezones,
            buf: bytes,
            agents,
            policies,
        })
    }

    /// The full configuration `delta` describes, its entries borrowed from this base and
    /// from the delta, and the changes to apply here once it is accepted. Fails when the
    /// delta is not against this version.
    pub fn merge<'x>(
        &'x self,
        delta: RawPluginConfig<'x>,
    ) -> Result<(RawPluginConfig<'x>, Changes), String> {
        let changes = self.changes(&delta)?;
        let Some(bundle) = delta.bundle else {
            return Err("a delta without a bundle".into());
        };
        let agents = merge_section(self.agents.entries(self), bundle.data.agents);
        let policies = merge_section(self.policies.entries(self), bundle.data.policies);
        // A delta leaves the modules out when they did not change.
        let modules = match bundle.modules.is_empty() {
            true => self.modules.clone(),
            false => bundle.modules,
        };
        let merged = RawPluginConfig {
            version: delta.version,
            base: None,
            mode: delta.mode,
            bundle: Some(RawBundle {
                modules,
                data: RawData {
                    agents,
                    policies,
                    timezones: bundle.data.timezones,
                },
            }),
            audit: delta.audit,
        };
        Ok((merged, changes))
    }

    /// The changes `delta` makes to these entries, to [`Retained::apply`] once its
    /// configuration is accepted (a VM that compiles the delta from what it lists, with
    /// `crate::policy::CompiledPolicy::compile_raw_delta`, merges nothing). Fails when the
    /// delta is not against this version.
    pub fn changes(&self, delta: &RawPluginConfig<'_>) -> Result<Changes, String> {
        let base = delta.base.as_deref().unwrap_or_default();
        if !self.serves(base, &delta.version) {
            return Err(format!(
                "a delta against version {base:?}, but this VM holds version {:?}",
                self.version
            ));
        }
        let Some(bundle) = &delta.bundle else {
            return Err("a delta without a bundle".into());
        };
        Ok(Changes {
            version: delta.version.clone(),
            modules: (!bundle.modules.is_empty()).then(|| bundle.modules.clone()),
            timezones: timezone_names(bundle.data.timezones.as_ref()),
            agents: owned(&bundle.data.agents),
            policies: owned(&bundle.data.policies),
        })
    }

    /// Makes these the entries of the configuration `changes` came from. The changes stay
    /// beside the buffer until they outgrow a quarter of it; then the buffer is written
    /// again with them.
    pub fn apply(&mut self, changes: Changes) {
        for (section, list) in [
            (&mut self.agents, changes.agents),
            (&mut self.policies, changes.policies),
        ] {
            section.overlay.extend(list);
        }
        if let Some(modules) = changes.modules {
            self.modules = modules;
        }
        self.timezones = changes.timezones;
        self.version = changes.version;
        let (sections, overlay) = [&self.agents, &self.policies]
            .iter()
            .fold((0, 0), |(n, o), s| (n + s.base.len(), o + s.overlay.len()));
        if overlay > OVERLAY_MIN.max(sections / 4)
            && let Some(written) = Self::decode(self.encode())
        {
            *self = written;
        }
    }
}

impl PartialEq for Retained {
    /// The same version, modules and entries, however they are laid out.
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.modules == other.modules
            && self.timezones == other.timezones
            && self.agents.entries(self) == other.agents.entries(other)
            && self.policies.entries(self) == other.policies.entries(other)
    }
}

impl Eq for Retained {}

// === impl Section ===

impl Section {
    /// Visits the entries in key order, each change instead of the buffer's entry with
    /// its key.
    fn walk<'a>(&'a self, buf: &[u8], mut visit: impl FnMut(Step<'a>)) {
        let mut overlay = self.overlay.iter().peekable();
        for span in &self.base {
            let key = buf.get(span.key.clone()).unwrap_or_default();
            while let Some((k, e)) = overlay.next_if(|(k, _)| k.as_bytes() < key) {
                visit(Step::Changed(k, e));
            }
            match overlay.next_if(|(k, _)| k.as_bytes() == key) {
                Some((k, e)) => visit(Step::Changed(k, e)),
                None => visit(Step::Kept(span)),
            }
        }
        overlay.for_each(|(k, e)| visit(Step::Changed(k, e)));
    }

    /// The entries in key order, the changes' over the buffer's (`of`'s).
    fn entries<'a>(&'a self, of: &'a Retained) -> Vec<Entry<'a>> {
        let mut out: Vec<Entry<'a>> = Vec::with_capacity(self.base.len() + self.overlay.len());
        self.walk(&of.buf, |step| match step {
            Step::Changed(key, e) => out.push((key, e.hash, &*e.text)),
            Step::Kept(span) => {
                let key = of.buf.get(span.key.clone()).unwrap_or_default();
                // Keys were checked as UTF-8 when the buffer was read.
                if let (Ok(key), Some(text)) =
                    (std::str::from_utf8(key), of.buf.get(span.text.clone()))
                {
                    out.push((key, span.hash, text));
                }
            }
        });
        out
    }

    /// Writes the entries in the shared form: a count, then each record in key order,
    /// runs of the buffer's records that no change splits copied in one piece.
    fn write(&self, buf: &[u8], out: &mut Vec<u8>) {
        let at = out.len();
        put_count(out, 0);
        let mut written = 0;
        // Records of `buf` not copied yet.
        let mut run = 0..0;
        let flush = |out: &mut Vec<u8>, run: &mut Range<usize>| {
            out.extend_from_slice(buf.get(run.clone()).unwrap_or_default());
            *run = 0..0;
        };
        self.walk(buf, |step| {
            written += 1;
            match step {
                Step::Changed(key, e) => {
                    flush(out, &mut run);
                    put_record(out, key, e.hash, &e.text);
                }
                Step::Kept(span) if !run.is_empty() && run.end == span.record.start => {
                    run.end = span.record.end;
                }
                Step::Kept(span) => {
                    flush(out, &mut run);
                    run = span.record.clone();
                }
            }
        });
        flush(out, &mut run);
        let count = u32::try_from(written).unwrap_or(u32::MAX).to_le_bytes();
        if let Some(slot) = out.get_mut(at..at + 4) {
            slot.copy_from_slice(&count);
        }
    }
}

/// An entry of a [`Section`]'s walk: the buffer's, or a change.
enum Step<'a> {
    Kept(&'a Span),
    Changed(&'a str, &'a Kept),
}

/// The shared form of a [`Retained`]: its version, its modules (a count, then each name
/// and source), its timezones' names (a count, then each), then the agents and the
/// policies (a count, then each record: key, hash and text), each in key order; `u32`
/// counts and lengths before what they count, `u64` hashes, little-endian.
fn write_form(
    version: &str,
    modules: &[RegoModule],
    timezones: &[String],
    sections: [&[Entry<'_>]; 2],
) -> Vec<u8> {
    let size: usize = sections
        .iter()
        .flat_map(|s| s.iter())
        .map(|(key, _, text)| key.len() + text.len() + 16)
        .sum();
    let mut out = Vec::with_capacity(size + 64);
    put_header(&mut out, version, modules, timezones);
    for section in sections {
        put_count(&mut out, section.len());
        for (key, hash, text) in section {
            put_record(&mut out, key, *hash, text);
        }
    }
    out
}

/// The shared form's version, modules and timezones.
fn put_header(out: &mut Vec<u8>, version: &str, modules: &[RegoModule], timezones: &[String]) {
    put_bytes(out, version.as_bytes());
    put_count(out, modules.len());
    for module in modules {
        put_bytes(out, module.name.as_bytes());
        put_bytes(out, module.source.as_bytes());
    }
    put_count(out, timezones.len());
    for tz in timezones {
        put_bytes(out, tz.as_bytes());
    }
}

/// An entry's record in the shared form.
fn put_record(out: &mut Vec<u8>, key: &str, hash: u64, text: &[u8]) {
    put_bytes(out, key.as_bytes());
    out.extend_from_slice(&hash.to_le_bytes());
    put_bytes(out, text);
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_count(out, b.len());
    out.extend_from_slice(b);
}

/// The names of a configuration's timezones (its `timezones` object's keys), sorted.
fn timezone_names(timezones: Option<&serde_json::Value>) -> Vec<String> {
    let mut names: Vec<String> = timezones
        .and_then(serde_json::Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    names.sort_unstable();
    names
}

/// A section's entries in key order, each key once (the later of two).
fn sorted<'a>(list: &'a [RawEntry<'_>]) -> Vec<Entry<'a>> {
    let mut entries: Vec<(usize, Entry<'a>)> = list
        .iter()
        .enumerate()
        .map(|(at, e)| (at, (&*e.key, e.content_hash(), e.text)))
        .collect();
    entries.sort_unstable_by(|(i, a), (j, b)| a.0.cmp(b.0).then(j.cmp(i)));
    entries.dedup_by(|later, kept| later.1.0 == kept.1.0);
    entries.into_iter().map(|(_, e)| e).collect()
}

/// Entries with their keys, owned.
fn owned(entries: &[RawEntry<'_>]) -> SectionChanges {
    entries
        .iter()
        .map(|e| {
            let kept = Kept {
                text: Box::from(e.text),
                hash: e.content_hash(),
            };
            (Box::from(&*e.key), kept)
        })
        .collect()
}

/// One section of a merged configuration: the base's entries the delta leaves alone, then
/// the delta's.
fn merge_section<'x>(mut base: Vec<Entry<'x>>, upserts: Vec<RawEntry<'x>>) -> Vec<RawEntry<'x>> {
    let touched: HashSet<&str> = upserts.iter().map(|e| &*e.key).collect();
    base.retain(|(key, _, _)| !touched.contains(key));
    let mut merged = raw(base);
    merged.extend(upserts);
    merged
}

/// Entries as a configuration's, borrowed.
fn raw(entries: Vec<Entry<'_>>) -> Vec<RawEntry<'_>> {
    entries
        .into_iter()
        .map(|(key, hash, text)| RawEntry {
            key: Cow::Borrowed(key),
            text,
            hash: Some(hash),
        })
        .collect()
}

/// The parts of a configuration besides its entries, as the wire has them.
struct Frame<'c> {
    version: &'c str,
    base: Option<&'c str>,
    mode: Mode,
    /// `None` in a delta whose modules did not change.
    modules: Option<&'c [RegoModule]>,
    timezones: Option<&'c serde_json::Value>,
    audit: Option<&'c AuditSink>,
}

/// Writes a configuration: `frame` with these entries (JSON texts, written as they are).
fn write<'e>(
    frame: &Frame<'_>,
    agents: impl Iterator<Item = (&'e str, &'e [u8])>,
    policies: impl Iterator<Item = (&'e str, &'e [u8])>,
    capacity: usize,
) -> Result<Vec<u8>, serde_json::Error> {
    fn entries<'e>(
        out: &mut Vec<u8>,
        list: impl Iterator<Item = (&'e str, &'e [u8])>,
    ) -> Result<(), serde_json::Error> {
        out.push(b'{');
        for (i, (key, text)) in list.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key)?;
            out.push(b':');
            out.extend_from_slice(text);
        }
        out.push(b'}');
        Ok(())
    }
    let mut out = Vec::with_capacity(capacity + 1024);
    out.extend_from_slice(b"{\"version\":");
    serde_json::to_writer(&mut out, frame.version)?;
    if let Some(base) = frame.base {
        out.extend_from_slice(b",\"base\":");
        serde_json::to_writer(&mut out, base)?;
    }
    out.extend_from_slice(b",\"mode\":");
    serde_json::to_writer(&mut out, &frame.mode)?;
    out.extend_from_slice(b",\"bundle\":{");
    if let Some(modules) = frame.modules {
        out.extend_from_slice(b"\"modules\":");
        serde_json::to_writer(&mut out, modules)?;
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":{\"agents\":");
    entries(&mut out, agents)?;
    out.extend_from_slice(b",\"policies\":");
    entries(&mut out, policies)?;
    if let Some(timezones) = frame.timezones {
        out.extend_from_slice(b",\"timezones\":");
        serde_json::to_writer(&mut out, timezones)?;
    }
    out.extend_from_slice(b"}}");
    if let Some(audit) = frame.audit {
        out.extend_from_slice(b",\"audit\":");
        serde_json::to_writer(&mut out, audit)?;
    }
    out.push(b'}');
    Ok(out)
}

/// The JSON text of a full configuration with a bundle (a merged delta, say); `None`
/// for one without a bundle, or a delta.
#[cfg(test)]
fn full_json(config: &RawPluginConfig<'_>) -> Option<Vec<u8>> {
    let bundle = config.bundle.as_ref()?;
    if config.base.is_some() {
        return None;
    }
    let frame = Frame {
        version: &config.version,
        base: None,
        mode: config.mode,
        modules: Some(&bundle.modules),
        timezones: bundle.data.timezones.as_ref(),
        audit: config.audit.as_ref(),
    };
    let size: usize = bundle
        .data
        .agents
        .iter()
        .chain(&bundle.data.policies)
        .map(|e| e.key.len() + e.text.len() + 4)
        .sum();
    write(
        &frame,
        bundle.data.agents.iter().map(|e| (&*e.key, e.text)),
        bundle.data.policies.iter().map(|e| (&*e.key, e.text)),
        size,
    )
    .ok()
}

/// The entries of `after` that `before` lacks or has with another text; `None` when
/// `before` has a key that `after` lacks.
fn changed<'e>(
    before: &[RawEntry<'_>],
    after: &'e [RawEntry<'e>],
) -> Option<Vec<(&'e str, &'e [u8])>> {
    let after_keys: HashSet<&str> = after.iter().map(|e| &*e.key).collect();
    if before.iter().any(|e| !after_keys.contains(&*e.key)) {
        return None;
    }
    let before: HashMap<&str, &[u8]> = before.iter().map(|e| (&*e.key, e.text)).collect();
    Some(
        after
            .iter()
            .filter(|e| before.get(&*e.key) != Some(&e.text))
            .map(|e| (&*e.key, e.text))
            .collect(),
    )
}

/// The delta that turns the full configuration `base` into the full configuration `next`
/// (both as sent): `next`'s version, mode, timezones and audit sink, its modules if they
/// changed, and the agents and policies added or changed. `None` (`next` then goes as it
/// is) when either has no bundle, when `next` lacks an agent or a policy of `base` (a
/// gateway is never told the keys of what it no longer serves, and Envoy's configuration
/// dump keeps nothing of it), or when the delta would not be under half of `next`'s size.
pub fn delta(base: &[u8], next: &[u8]) -> Result<Option<Vec<u8>>, ConfigError> {
    let old = RawPluginConfig::from_slice(base)?;
    let new = RawPluginConfig::from_slice(next)?;
    let (Some(old_bundle), Some(new_bundle)) = (&old.bundle, &new.bundle) else {
        return Ok(None);
    };
    // A bundle without modules goes in full, to be refused as it is: in a delta, no
    // modules means the base's.
    if old.base.is_some()
        || new.base.is_some()
        || old.mode != Mode::Enforce
        || new.mode != Mode::Enforce
        || new_bundle.modules.is_empty()
    {
        return Ok(None);
    }
    let (Some(agents), Some(policies)) = (
        changed(&old_bundle.data.agents, &new_bundle.data.agents),
        changed(&old_bundle.data.policies, &new_bundle.data.policies),
    ) else {
        return Ok(None);
    };
    let size: usize = agents
        .iter()
        .chain(&policies)
        .map(|(k, t)| k.len() + t.len() + 4)
        .sum();
    if size > next.len() / 2 {
        return Ok(None);
    }
    let frame = Frame {
        version: &new.version,
        base: Some(&old.version),
        mode: new.mode,
        modules: (new_bundle.modules != old_bundle.modules).then_some(&new_bundle.modules[..]),
        timezones: new_bundle.data.timezones.as_ref(),
        audit: new.audit.as_ref(),
    };
    let out = write(&frame, agents.into_iter(), policies.into_iter(), size)?;
    Ok((out.len() <= next.len() / 2).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A full configuration of `agents` and `policies` (key → entry).
    fn config(
        version: &str,
        agents: &BTreeMap<String, Value>,
        policies: &BTreeMap<String, Value>,
    ) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "version": version,
            "mode": "enforce",
            "bundle": {
                "modules": [{"name": "m.rego", "source": "package m"}],
                "data": {"agents": agents, "policies": policies, "timezones": {"UTC": []}},
            },
            "audit": {
                "cluster": "c", "authority": "a", "path": "/p", "token": "t",
                "batchSize": 10, "flushIntervalMs": 100, "maxBuffered": 100, "timeoutMs": 1000,
            },
        }))
        .unwrap()
    }

    fn parsed(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn keep(bytes: &[u8]) -> Retained {
        Retained::keep(&RawPluginConfig::from_slice(bytes).unwrap()).unwrap()
    }

    /// Applies `delta` to `retained` as a VM does; returns the merged configuration's text.
    fn apply(retained: &mut Retained, delta: &[u8]) -> Vec<u8> {
        let delta = RawPluginConfig::from_slice(delta).unwrap();
        let (merged, changes) = retained.merge(delta).unwrap();
        let full = full_json(&merged).unwrap();
        drop(merged);
        retained.apply(changes);
        full
    }

    /// A chain of random edits (agents and policies changed, added and removed), each sent
    /// as a delta against the previous version where it can be: every merged
    /// configuration equals the one the control plane published, the kept entries equal
    /// a fresh VM's, and exactly the pushes that remove something go in full.
    #[test]
    fn deltas_rebuild_every_configuration_of_a_chain() {
        let mut agents: BTreeMap<String, Value> = (0..60)
            .map(|i| {
                let agent =
                    json!({"name": format!("agent {i}"), "status": "active", "policies": ["p1"]});
                (format!("{i:064x}"), agent)
            })
            .collect();
        let mut policies: BTreeMap<String, Value> = (0..10)
            .map(|i| {
                let policy = json!({"id": format!("p{i}"), "domains": [format!("d{i}.example")]});
                (format!("p{i}"), policy)
            })
            .collect();
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d_u64);
        let mut previous = config("1", &agents, &policies);
        let mut retained = keep(&previous);
        let (mut deltas, mut fulls) = (0, 0);
        for version in 2..60 {
            let before: Vec<String> = agents.keys().chain(policies.keys()).cloned().collect();
            for _ in 0..next(4) {
                let key = format!("{:064x}", next(80));
                if next(6) == 0 {
                    agents.remove(&key);
                } else {
                    let agent = json!({"status": "active", "policies": [format!("p{}", next(12))], "n": version});
                    agents.insert(key, agent);
                }
            }
            if next(3) == 0 {
                let key = format!("p{}", next(12));
                if next(4) == 0 {
                    policies.remove(&key);
                } else {
                    let policy = json!({"id": key, "domains": [format!("v{version}.example")]});
                    policies.insert(key, policy);
                }
            }
            let removed = before
                .iter()
                .any(|k| !agents.contains_key(k) && !policies.contains_key(k));
            let full = config(&version.to_string(), &agents, &policies);
            match delta(&previous, &full).unwrap() {
                Some(delta) => {
                    assert!(!removed, "version {version} removes an entry");
                    assert!(delta.len() * 2 <= full.len());
                    assert_eq!(parsed(&apply(&mut retained, &delta)), parsed(&full));
                    deltas += 1;
                }
                None => {
                    assert!(removed, "version {version} went in full");
                    retained = keep(&full);
                    fulls += 1;
                }
            }
            assert_eq!(retained, keep(&full), "version {version}");
            // Written with the changes beside the buffer, the shared form is the one a
            // VM holding the whole configuration writes.
            assert_eq!(retained.encode(), keep(&full).encode(), "version {version}");
            // The next canary reads them back as they were published.
            assert_eq!(
                Retained::decode(retained.encode()).as_ref(),
                Some(&retained)
            );
            previous = full;
        }
        assert!(deltas > 20 && fulls > 3, "{deltas} deltas, {fulls} in full");
    }

    /// A long-lived VM's changes stay beside its buffer until they outgrow a quarter of
    /// it (and `OVERLAY_MIN`), then go into a buffer written again: the entries are those
    /// of the latest configuration all along, and the changes kept beside stay bounded.
    #[test]
    fn changes_are_written_into_the_buffer_once_they_outgrow_it() {
        let mut agents: BTreeMap<String, Value> = (0..300)
            .map(|i| (format!("a{i:03}"), json!({"status": "active", "n": 0})))
            .collect();
        let policies = BTreeMap::from([("p".to_owned(), json!({"id": "p"}))]);
        let mut previous = config("0", &agents, &policies);
        let mut retained = keep(&previous);
        let mut written = 0;
        for version in 1..=120 {
            // Two agents changed, one added, per push.
            for key in [
                format!("a{:03}", version * 7 % 300),
                format!("a{:03}", version * 13 % 300),
            ] {
                agents.insert(key, json!({"status": "active", "n": version}));
            }
            agents.insert(format!("b{version:03}"), json!({"status": "active"}));
            let full = config(&version.to_string(), &agents, &policies);
            let overlay_before = retained.agents.overlay.len();
            apply(&mut retained, &delta(&previous, &full).unwrap().unwrap());
            if retained.agents.overlay.len() < overlay_before {
                assert!(retained.agents.overlay.is_empty());
                written += 1;
            }
            let (a, p) = (&retained.agents, &retained.policies);
            let limit = OVERLAY_MIN.max((a.base.len() + p.base.len()) / 4);
            let beside = a.overlay.len() + p.overlay.len();
            assert!(
                beside <= limit,
                "version {version}: {beside} changes beside"
            );
            assert_eq!(retained, keep(&full), "version {version}");
            assert_eq!(retained.encode(), keep(&full).encode(), "version {version}");
            previous = full;
        }
        assert!(written >= 3, "the buffer was written again {written} times");
    }

    /// A delta names its base: against another version it is refused, and the kept
    /// entries stay as they were. Only what changed travels.
    #[test]
    fn a_delta_against_another_version_is_refused() {
        let agents: BTreeMap<String, Value> = (0..20)
            .map(|i| (format!("a{i}"), json!({"status": "active"})))
            .collect();
        let policies = BTreeMap::from([("p".to_owned(), json!({"id": "p"}))]);
        let one = config("1", &agents, &policies);
        let mut changed = agents.clone();
        changed.insert("a3".into(), json!({"status": "suspended"}));
        let two = config("2", &changed, &policies);
        let three = config("3", &agents, &policies);
        let delta_3 = delta(&two, &three).unwrap().unwrap();
        let retained = keep(&one);
        let err = retained
            .merge(RawPluginConfig::from_slice(&delta_3).unwrap())
            .unwrap_err();
        assert!(err.contains("\"2\"") && err.contains("\"1\""), "{err}");
        assert_eq!(retained, keep(&one));
        // Entries already of the delta's version take it again unchanged.
        let mut at_two = keep(&two);
        let delta_2 = delta(&one, &two).unwrap().unwrap();
        assert_eq!(parsed(&apply(&mut at_two, &delta_2)), parsed(&two));
        assert_eq!(at_two, keep(&two));
        // The shared form is refused cut short or with bytes after it.
        let encoded = at_two.encode();
        assert!(Retained::decode(encoded[..encoded.len() - 1].to_vec()).is_none());
        assert!(Retained::decode([encoded.as_slice(), b"x"].concat()).is_none());
        assert!(Retained::decode(Vec::new()).is_none());

        let delta_2 = parsed(&delta(&one, &two).unwrap().unwrap());
        assert_eq!(delta_2["base"], "1");
        let data = &delta_2["bundle"]["data"];
        assert_eq!(data["agents"], json!({"a3": {"status": "suspended"}}));
        assert_eq!(data["policies"], json!({}));
        assert!(delta_2["bundle"].get("modules").is_none(), "{delta_2}");
        // A delta is not a full configuration.
        let as_config = serde_json::to_vec(&delta_2).unwrap();
        assert!(full_json(&RawPluginConfig::from_slice(&as_config).unwrap()).is_none());
        assert!(Retained::keep(&RawPluginConfig::from_slice(&as_config).unwrap()).is_none());
    }

    /// Removals, changes to most of the configuration, and configurations without a
    /// bundle go in full.
    #[test]
    fn removals_large_changes_and_bundleless_configurations_go_in_full() {
        let agents: BTreeMap<String, Value> = (0..10)
            .map(|i| (format!("a{i}"), json!({"status": "active"})))
            .collect();
        let policies = BTreeMap::new();
        let one = config("1", &agents, &policies);
        let mut fewer = agents.clone();
        fewer.remove("a7");
        assert!(
            delta(&one, &config("2", &fewer, &policies))
                .unwrap()
                .is_none()
        );
        let renamed: BTreeMap<String, Value> = agents
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({"status": v["status"], "pad": "x".repeat(40)}),
                )
            })
            .collect();
        assert!(
            delta(&one, &config("2", &renamed, &policies))
                .unwrap()
                .is_none()
        );
        let deny = br#"{"version":"deny-all","mode":"denyAll"}"#;
        assert!(delta(deny, &one).unwrap().is_none());
        assert!(delta(&one, deny).unwrap().is_none());
        assert!(delta(b"{", &one).is_err());
    }
}
