//! The filter's plugin configuration: the wire contract of the ECDS resource.
//!
//! The control plane serialises [`PluginConfig`] as JSON into the wasm filter's
//! `configuration` field; the filter parses it once in `on_configure`. See
//! `docs/contracts.md` for the versioned description.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// What the filter does with requests under this configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Evaluate the bundle's policy.
    #[default]
    Enforce,
    /// Deny every request with reason `not_configured` (the fail-closed default config
    /// Envoy applies until the control plane's bundle arrives).
    DenyAll,
    /// Allow every request with reason `not_configured` (an operator's explicit fail-open
    /// default).
    AllowAll,
}

/// The complete filter configuration delivered over ECDS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    /// Opaque bundle version, echoed in audit records and stats.
    pub version: String,
    /// Present in a delta (`crate::delta`): the version whose agents and policies the
    /// bundle changes. Its `data` then holds only the agents and policies added or
    /// changed since; a bundle that drops one is always sent in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Rego modules and data; required in [`Mode::Enforce`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<Bundle>,
    /// Where audit batches go; without it decisions are not audited (default configs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSink>,
}

/// [`PluginConfig`] as the filter reads it in `on_configure`: the same JSON, but the
/// bundle's agents and policies stay JSON text borrowed from the configuration, so that
/// entries unchanged since the previous configuration are never parsed
/// (`crate::data::EntryCache`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPluginConfig<'a> {
    pub version: String,
    /// [`PluginConfig::base`].
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default, borrow)]
    pub bundle: Option<RawBundle<'a>>,
    #[serde(default)]
    pub audit: Option<AuditSink>,
}

/// [`Bundle`] with its data's entries as JSON text.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawBundle<'a> {
    /// Absent in a delta whose modules did not change (`crate::delta`); a full
    /// configuration without modules is refused when compiled.
    #[serde(default)]
    pub modules: Vec<RegoModule>,
    #[serde(borrow)]
    pub data: RawData<'a>,
}

/// How a VM read a configuration, as the filter's `on_configure` log line says it
/// (`root N: configuration V loaded (Mode, B bytes, <how>A agents, …)`): the filter
/// writes [`ConfigRead::log_prefix`], the bench and the tests read it back with
/// [`ConfigRead::strip`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigRead {
    /// Parsed in full.
    Parsed,
    /// Through the index another VM published for the same bytes.
    Indexed,
    /// A delta applied to the entries this VM kept of its base.
    Delta,
    /// A delta compiled from the entries it lists, on the entries this VM prepared for
    /// its base (`crate::policy::CompiledPolicy::compile_raw_delta`): a long-lived VM's
    /// way.
    DeltaListed,
    /// A delta applied to the entries the previous canary published (or the entries a
    /// canary published for this very version).
    DeltaShared,
    /// A delta checked against the entries the previous canary published, without
    /// preparing those it leaves alone (`crate::policy::CompiledPolicy::check_delta`): a
    /// VM's way that decides no requests yet, Envoy's configuration canary's.
    DeltaChecked,
}

impl ConfigRead {
    /// What the log line says before the counts (nothing when parsed in full).
    pub fn log_prefix(self) -> &'static str {
        match self {
            Self::Parsed => "",
            Self::Indexed => "read through the index, ",
            Self::Delta => "a delta, ",
            Self::DeltaListed => "a delta from what it lists, ",
            Self::DeltaShared => "a delta on the published base, ",
            Self::DeltaChecked => "a delta checked against the published base, ",
        }
    }

    /// How a log line's text after `B bytes, ` says the configuration was read, and the
    /// text after that.
    pub fn strip(text: &str) -> (Self, &str) {
        [
            Self::Indexed,
            Self::Delta,
            Self::DeltaListed,
            Self::DeltaShared,
            Self::DeltaChecked,
        ]
        .into_iter()
        .find_map(|read| Some((read, text.strip_prefix(read.log_prefix())?)))
        .unwrap_or((Self::Parsed, text))
    }
}

/// The data document with agents and policies as JSON text, keyed like [`Bundle::data`],
/// in document order (a later duplicate key wins where they are used, as in a map).
#[derive(Debug, Deserialize)]
pub struct RawData<'a> {
    #[serde(default, borrow, deserialize_with = "members")]
    pub agents: Vec<RawEntry<'a>>,
    #[serde(default, borrow, deserialize_with = "members")]
    pub policies: Vec<RawEntry<'a>>,
    #[serde(default)]
    pub timezones: Option<serde_json::Value>,
}

/// An agent or a policy of a configuration: its key and its JSON text, both borrowed
/// from the configuration (the key unless escaped), and the text's hash (taken when the
/// text is parsed, or from the [`ConfigIndex`] it was read through).
#[derive(Debug, Clone)]
pub struct RawEntry<'a> {
    pub key: Cow<'a, str>,
    pub text: &'a [u8],
    pub hash: Option<u64>,
}

impl RawEntry<'_> {
    /// The hash of its text (`crate::data::text_hash`), taken now if it was not known.
    pub fn content_hash(&self) -> u64 {
        self.hash
            .unwrap_or_else(|| crate::data::text_hash(self.text))
    }
}

/// Where the entries of one configuration sit in its bytes, so that a VM loading the
/// same bytes again skips parsing them: Envoy loads every configuration first in its
/// canary, which parses it fully and publishes this, then in each worker VM. The bytes
/// are recognised by their length, a hash of all of them and the version they carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIndex {
    version: String,
    len: u64,
    id: u64,
    /// Spans cut out of the bytes to leave a skeleton (the `agents` and `policies`
    /// members), ascending.
    cuts: Vec<(u32, u32)>,
    agents: Vec<Indexed>,
    policies: Vec<Indexed>,
}

/// One entry of a [`ConfigIndex`]: its key's and its text's spans, the text's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Indexed {
    key: (u32, u32),
    text: (u32, u32),
    hash: u64,
}

/// A JSON object's members, values as borrowed text and keys borrowed unless escaped: a
/// configuration's thousands of entries are listed without a map or a copy.
fn members<'de, D>(d: D) -> Result<Vec<RawEntry<'de>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Members;
    struct Key<'de>(Cow<'de, str>);
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<RawEntry<'de>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                // Hashed once here: the entry cache and the index both use it.
                let text = value.get().as_bytes();
                members.push(RawEntry {
                    key,
                    text,
                    hash: Some(crate::data::text_hash(text)),
                });
            }
            Ok(members)
        }
    }
    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Key(Cow::Owned(v.to_owned())))
                }
            }
            d.deserialize_str(Visit)
        }
    }
    d.deserialize_map(Members)
}

/// Rego modules plus the data document they evaluate against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bundle {
    pub modules: Vec<RegoModule>,
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegoModule {
    pub name: String,
    pub source: String,
}

/// The control plane's audit ingest endpoint, reached through an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSink {
    /// Envoy cluster name of the control plane's HTTP API.
    pub cluster: String,
    /// `:authority` sent with the callout.
    pub authority: String,
    /// Path of the ingest endpoint.
    pub path: String,
    /// Bearer credential of the filter (never an admin token). Never logged.
    pub token: String,
    /// Flush when this many records are queued.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Flush at least this often (milliseconds); also the retry tick.
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Records kept per worker VM while the control plane is unreachable; beyond it the
    /// oldest are dropped and counted.
    #[serde(default = "defaults::max_buffered")]
    pub max_buffered: usize,
    /// Callout timeout (milliseconds).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

mod defaults {
    pub(super) fn batch_size() -> usize {
        1_000
    }
    pub(super) fn flush_interval_ms() -> u64 {
        500
    }
    pub(super) fn max_buffered() -> usize {
        10_000
    }
    pub(super) fn timeout_ms() -> u64 {
        2_000
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration is not valid JSON for the plugin contract: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("mode enforce needs a bundle")]
    MissingBundle,
    #[error("audit sink field {0} must not be empty or zero")]
    InvalidAudit(&'static str),
}

/// The checks every configuration passes, whichever way it was parsed.
fn check(mode: Mode, has_bundle: bool, audit: Option<&AuditSink>) -> Result<(), ConfigError> {
    if mode == Mode::Enforce && !has_bundle {
        return Err(ConfigError::MissingBundle);
    }
    match audit {
        Some(audit) => audit.check(),
        None => Ok(()),
    }
}

// === impl RawPluginConfig ===

impl<'a> RawPluginConfig<'a> {
    /// Parses and checks a configuration like [`PluginConfig::from_slice`], borrowing the
    /// bundle's entries from `bytes`.
    pub fn from_slice(bytes: &'a [u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes)?;
        check(config.mode, config.bundle.is_some(), config.audit.as_ref())?;
        Ok(config)
    }

    /// Reads `bytes` through `index` when it describes exactly these bytes: only the
    /// skeleton left by cutting the entries out is parsed; the entries are taken from
    /// their spans, with their hashes. `None` when the index is for other bytes.
    pub fn from_index(bytes: &'a [u8], index: &ConfigIndex) -> Option<Self> {
        if bytes.len() as u64 != index.len || bytes_hash(bytes) != index.id {
            return None;
        }
        let mut skeleton = Vec::with_capacity(4096);
        let mut at = 0;
        for &(start, end) in &index.cuts {
            skeleton.extend_from_slice(bytes.get(at..start as usize)?);
            at = end as usize;
        }
        skeleton.extend_from_slice(bytes.get(at..)?);
        let parsed = RawPluginConfig::from_slice(&skeleton).ok()?;
        let bundle = parsed.bundle?;
        if parsed.version != index.version
            || !bundle.data.agents.is_empty()
            || !bundle.data.policies.is_empty()
        {
            return None;
        }
        let entries = |list: &[Indexed]| -> Option<Vec<RawEntry<'a>>> {
            list.iter()
                .map(|e| {
                    let key = bytes.get(e.key.0 as usize..e.key.1 as usize)?;
                    Some(RawEntry {
                        key: Cow::Borrowed(std::str::from_utf8(key).ok()?),
                        text: bytes.get(e.text.0 as usize..e.text.1 as usize)?,
                        hash: Some(e.hash),
                    })
                })
                .collect()
        };
        Some(Self {
            version: parsed.version,
            base: parsed.base,
            mode: parsed.mode,
            audit: parsed.audit,
            bundle: Some(RawBundle {
                modules: bundle.modules,
                data: RawData {
                    agents: entries(&index.agents)?,
                    policies: entries(&index.policies)?,
                    timezones: bundle.data.timezones,
                },
            }),
        })
    }
}

// === impl ConfigIndex ===

impl ConfigIndex {
    /// The index of `config`, parsed from `bytes`; `None` when it has no bundle or an
    /// escaped key (which is not a span of the bytes).
    pub fn build(bytes: &[u8], config: &RawPluginConfig<'_>) -> Option<Self> {
        let data = &config.bundle.as_ref()?.data;
        let base = bytes.as_ptr() as usize;
        let span = |part: &[u8]| -> Option<(u32, u32)> {
            let start = (part.as_ptr() as usize).checked_sub(base)?;
            let end = start + part.len();
            (end <= bytes.len()).then_some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
        };
        let mut cuts = Vec::new();
        let mut list = |entries: &[RawEntry<'_>]| -> Option<Vec<Indexed>> {
            let indexed = entries
                .iter()
                .map(|e| {
                    let Cow::Borrowed(key) = &e.key else {
                        return None;
                    };
                    Some(Indexed {
                        key: span(key.as_bytes())?,
                        text: span(e.text)?,
                        hash: e.content_hash(),
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            if let (Some(first), Some(last)) = (indexed.first(), indexed.last()) {
                // From the first key's opening quote to the end of the last value: what
                // is left between the braces is an empty object.
                let start = first.key.0.checked_sub(1)?;
                (bytes.get(start as usize) == Some(&b'"')).then_some(())?;
                cuts.push((start, last.text.1));
            }
            Some(indexed)
        };
        let agents = list(&data.agents)?;
        let policies = list(&data.policies)?;
        cuts.sort_unstable();
        if cuts.iter().zip(cuts.iter().skip(1)).any(|(a, b)| a.1 > b.0) {
            return None;
        }
        Some(Self {
            version: config.version.clone(),
            len: bytes.len() as u64,
            id: bytes_hash(bytes),
            cuts,
            agents,
            policies,
        })
    }

    /// The shared form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + (self.agents.len() + self.policies.len()) * 24);
        let u32s = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
        u32s(&mut out, self.version.len() as u32);
        out.extend_from_slice(self.version.as_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        u32s(&mut out, self.cuts.len() as u32);
        for &(a, b) in &self.cuts {
            u32s(&mut out, a);
            u32s(&mut out, b);
        }
        for list in [&self.agents, &self.policies] {
            u32s(&mut out, list.len() as u32);
            for e in list {
                for v in [e.key.0, e.key.1, e.text.0, e.text.1] {
                    u32s(&mut out, v);
                }
                out.extend_from_slice(&e.hash.to_le_bytes());
            }
        }
        out
    }

    /// Reads the shared form; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        Self::decode_for(bytes, None)
    }

    /// [`ConfigIndex::decode`] of the index of a configuration of `len` bytes: `None`,
    /// without reading the entries, when it indexes one of another length (a delta, say,
    /// after the full configuration the canary indexed).
    pub fn decode_for(bytes: &[u8], len: Option<usize>) -> Option<Self> {
        let mut r = Reader(bytes);
        let n = r.u32()? as usize;
        let version = String::from_utf8(r.take(n)?.to_vec()).ok()?;
        let (indexed_len, id) = (r.u64()?, r.u64()?);
        if len.is_some_and(|len| len as u64 != indexed_len) {
            return None;
        }
        let len = indexed_len;
        let cuts = (0..r.u32()?)
            .map(|_| Some((r.u32()?, r.u32()?)))
            .collect::<Option<Vec<_>>>()?;
        let mut list = || -> Option<Vec<Indexed>> {
            (0..r.u32()?)
                .map(|_| {
                    Some(Indexed {
                        key: (r.u32()?, r.u32()?),
                        text: (r.u32()?, r.u32()?),
                        hash: r.u64()?,
                    })
                })
                .collect()
        };
        let agents = list()?;
        let policies = list()?;
        Some(Self {
            version,
            len,
            id,
            cuts,
            agents,
            policies,
        })
    }
}

/// Reads little-endian numbers off the front of a byte slice.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// A fast 64-bit hash of a whole configuration (recognising the bytes an index was made
/// from; the version and the length are checked too), of an entry's text or of Rego
/// modules. Not for adversarial input: it tells changes apart (inputs of the same length
/// that differ in one 8-byte word always hash differently), it does not resist forged
/// collisions.
pub(crate) fn bytes_hash(bytes: &[u8]) -> u64 {
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
    // Four independent lanes over 32-byte blocks: the multiplications do not wait for
    // one another.
    let mut lanes = [1, 2, 3, 4].map(|i: u64| (bytes.len() as u64 + i).wrapping_mul(MIX_K));
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = hash_mix(*lane, word(w));
        }
    }
    let mut h = lanes.into_iter().fold(0, hash_mix);
    // The tail: whole words, then the last bytes as one word (the length, in every lane's
    // start, tells tails of different lengths apart).
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        h = hash_mix(h, word(w));
    }
    let last = words.remainder();
    if !last.is_empty() {
        let mut tail = [0u8; 8];
        tail.iter_mut().zip(last).for_each(|(t, b)| *t = *b);
        h = hash_mix(h, u64::from_le_bytes(tail));
    }
    hash_finish(h)
}

const MIX_K: u64 = 0x9e37_79b9_7f4a_7c15;

/// One step of [`bytes_hash`]: takes `w` into the state `h` (a bijection of `h` for a
/// given `w`). Also combines hashes of fields (the memo key).
pub(crate) fn hash_mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(MIX_K).rotate_left(31)
}

/// The last step of [`bytes_hash`]: spreads the high bits into the low ones.
pub(crate) fn hash_finish(h: u64) -> u64 {
    h ^ (h >> 29)
}

/// The hasher of maps whose keys no client chooses (memo hashes, connection ids, the
/// bundle's agent and policy ids): [`bytes_hash`]'s mixing instead of SipHash, which
/// costs more in wasm than the lookups it serves. A `u64` key is mixed in as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher(u64);

/// Builds [`FastHasher`]s: `HashMap<K, V, FastHash>`.
pub type FastHash = std::hash::BuildHasherDefault<FastHasher>;

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        hash_finish(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = hash_mix(self.0, bytes_hash(bytes));
    }

    fn write_u8(&mut self, n: u8) {
        self.0 = hash_mix(self.0, u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = hash_mix(self.0, n);
    }
}

// === impl PluginConfig ===

impl PluginConfig {
    /// Parses and checks a configuration; the only place configuration JSON is read.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes)?;
        check(config.mode, config.bundle.is_some(), config.audit.as_ref())?;
        Ok(config)
    }

    /// The fail-closed configuration used before the control plane's bundle arrives.
    pub fn deny_all() -> Self {
        Self {
            version: "default-deny".into(),
            base: None,
            mode: Mode::DenyAll,
            bundle: None,
            audit: None,
        }
    }
}

// === impl AuditSink ===

impl AuditSink {
    fn check(&self) -> Result<(), ConfigError> {
        let fields: [(&'static str, bool); 7] = [
            ("cluster", self.cluster.is_empty()),
            ("authority", self.authority.is_empty()),
            ("path", self.path.is_empty()),
            (
                "batchSize",
                self.batch_size == 0 || self.batch_size > crate::audit::MAX_BATCH,
            ),
            ("flushIntervalMs", self.flush_interval_ms == 0),
            ("maxBuffered", self.max_buffered == 0),
            ("timeoutMs", self.timeout_ms == 0),
        ];
        match fields.iter().find(|(_, bad)| *bad) {
            Some((name, _)) => Err(ConfigError::InvalidAudit(name)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way of reading a configuration is read back from its log prefix.
    #[test]
    fn config_reads_round_trip_through_their_log_prefix() {
        for read in [
            ConfigRead::Parsed,
            ConfigRead::Indexed,
            ConfigRead::Delta,
            ConfigRead::DeltaListed,
            ConfigRead::DeltaShared,
        ] {
            let line = format!("{}3 agents, 0 policies", read.log_prefix());
            assert_eq!(ConfigRead::strip(&line), (read, "3 agents, 0 policies"));
        }
    }

    /// The canary's index reads the same bytes back as parsing them does, with the
    /// entries' hashes; it is refused for other bytes (one byte changed, another length,
    /// another version) and for a configuration with an escaped key.
    #[test]
    fn an_index_reads_the_bytes_it_was_made_from() {
        let text = br#"{"version":"7","mode":"enforce","bundle":{"modules":[],"data":{"agents":{"ab":{"status":"active"}, "cd" : {"status":"pending","policies":["p"]}},"policies":{"p":{"id":"p"}},"timezones":null}}}"#;
        let parsed = RawPluginConfig::from_slice(text).unwrap();
        let index = ConfigIndex::build(text, &parsed).unwrap();
        assert_eq!(ConfigIndex::decode(&index.encode()), Some(index.clone()));
        assert_eq!(ConfigIndex::decode(&index.encode()[..20]), None);
        assert_eq!(
            ConfigIndex::decode_for(&index.encode(), Some(text.len())),
            Some(index.clone())
        );
        assert_eq!(
            ConfigIndex::decode_for(&index.encode(), Some(text.len() + 1)),
            None
        );
        let read = RawPluginConfig::from_index(text, &index).unwrap();
        let entries = |c: &RawPluginConfig<'_>| -> Vec<(String, Vec<u8>)> {
            let data = &c.bundle.as_ref().unwrap().data;
            data.agents
                .iter()
                .chain(&data.policies)
                .map(|e| (e.key.to_string(), e.text.to_vec()))
                .collect()
        };
        assert_eq!(entries(&read), entries(&parsed));
        assert_eq!(entries(&read).len(), 3);
        let data = &read.bundle.as_ref().unwrap().data;
        assert_eq!(
            data.agents[1].hash,
            Some(crate::data::text_hash(data.agents[1].text))
        );
        assert_eq!(read.version, "7");

        let mut changed = text.to_vec();
        let at = changed.iter().position(|&b| b == b'p').unwrap();
        changed[at] = b'P';
        assert!(RawPluginConfig::from_index(&changed, &index).is_none());
        assert!(RawPluginConfig::from_index(&text[..text.len() - 1], &index).is_none());
        let other = String::from_utf8(text.to_vec())
            .unwrap()
            .replace(r#""7""#, r#""8""#);
        let other_index = ConfigIndex::build(
            other.as_bytes(),
            &RawPluginConfig::from_slice(other.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(RawPluginConfig::from_index(text, &other_index).is_none());
        let escaped = String::from_utf8(text.to_vec())
            .unwrap()
            .replace(r#""ab""#, r#""a\u0062""#);
        assert!(
            ConfigIndex::build(
                escaped.as_bytes(),
                &RawPluginConfig::from_slice(escaped.as_bytes()).unwrap()
            )
            .is_none()
        );
    }

    /// Entries are listed in document order with their text; keys are borrowed unless
    /// escaped; a non-object is an error.
    #[test]
    fn raw_data_lists_members_in_order() {
        let data: RawData<'_> =
            serde_json::from_str(r#"{"agents": {"b": {"x": 1}, "a\u0062": [2], "b": 3}}"#).unwrap();
        let agents: Vec<(&str, &str, bool)> = data
            .agents
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e.text).unwrap();
                (e.key.as_ref(), text, matches!(e.key, Cow::Borrowed(_)))
            })
            .collect();
        assert_eq!(
            agents,
            [
                ("b", r#"{"x": 1}"#, true),
                ("ab", "[2]", false),
                ("b", "3", true)
            ]
        );
        assert!(data.policies.is_empty());
        assert!(serde_json::from_str::<RawData<'_>>(r#"{"agents": []}"#).is_err());
    }

    #[test]
    fn deny_all_round_trips() {
        let json = serde_json::to_vec(&PluginConfig::deny_all()).unwrap();
        assert_eq!(
            PluginConfig::from_slice(&json).unwrap(),
            PluginConfig::deny_all()
        );
    }

    #[test]
    fn enforce_without_bundle_is_refused() {
        let err = PluginConfig::from_slice(br#"{"version":"1"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::MissingBundle));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = PluginConfig::from_slice(br#"{"version":"1","mode":"denyAll","x":1}"#);
        assert!(matches!(err, Err(ConfigError::Parse(_))));
    }

    #[test]
    fn empty_audit_fields_are_refused() {
        let json = br#"{"version":"1","mode":"denyAll","audit":{"cluster":"","authority":"cp","path":"/a","token":"t"}}"#;
        let err = PluginConfig::from_slice(json).unwrap_err();
        assert!(matches!(err, ConfigError::InvalidAudit("cluster")));
    }

    #[test]
    fn batches_larger_than_the_ingest_limit_are_refused() {
        let json = |size: usize| {
            format!(
                r#"{{"version":"1","mode":"denyAll","audit":{{"cluster":"c","authority":"a","path":"/p","token":"t","batchSize":{size}}}}}"#
            )
        };
        assert!(PluginConfig::from_slice(json(crate::audit::MAX_BATCH).as_bytes()).is_ok());
        let err =
            PluginConfig::from_slice(json(crate::audit::MAX_BATCH + 1).as_bytes()).unwrap_err();
        assert!(matches!(err, ConfigError::InvalidAudit("batchSize")));
    }
}
