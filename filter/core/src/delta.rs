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
    AuditSink, ConfigError, Mode, RawBundle, RawData, RawEntry, RawPluginConfig, RegoModule,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

/// An entry's JSON text and its hash, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    text: Box<[u8]>,
    hash: u64,
}

type Section = BTreeMap<Box<str>, Kept>;

/// Keys with their new entries.
type SectionChanges = Vec<(Box<str>, Kept)>;

/// The agents and policies of the configuration a VM accepted last: the base the next
/// delta applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    version: String,
    modules: Vec<RegoModule>,
    agents: Section,
    policies: Section,
}

/// A delta's changes, owned: applied to the [`Retained`] it was merged with once its
/// configuration is accepted.
#[derive(Debug)]
pub struct Changes {
    version: String,
    /// New modules; `None`: the base's.
    modules: Option<Vec<RegoModule>>,
    agents: SectionChanges,
    policies: SectionChanges,
}

// === impl Retained ===

impl Retained {
    /// The entries of a full configuration with a bundle.
    pub fn keep(config: &RawPluginConfig<'_>) -> Option<Self> {
        if config.base.is_some() {
            return None;
        }
        let bundle = config.bundle.as_ref()?;
        let data = &bundle.data;
        Some(Self {
            version: config.version.clone(),
            modules: bundle.modules.clone(),
            agents: owned(&data.agents),
            policies: owned(&data.policies),
        })
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

    /// The shared form, for the next canary: lengths, keys, hashes and texts, read back
    /// without parsing JSON ([`Retained::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let modules = serde_json::to_vec(&self.modules).unwrap_or_default();
        let size: usize = self
            .agents
            .iter()
            .chain(&self.policies)
            .map(|(k, e)| k.len() + e.text.len() + 16)
            .sum();
        let mut out = Vec::with_capacity(size + modules.len() + self.version.len() + 16);
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        bytes(&mut out, self.version.as_bytes());
        bytes(&mut out, &modules);
        for section in [&self.agents, &self.policies] {
            out.extend_from_slice(&(section.len() as u32).to_le_bytes());
            for (key, e) in section {
                bytes(&mut out, key.as_bytes());
                out.extend_from_slice(&e.hash.to_le_bytes());
                bytes(&mut out, &e.text);
            }
        }
        out
    }

    /// Reads the shared form; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        fn take<'b>(r: &mut crate::config::Reader<'b>) -> Option<&'b [u8]> {
            let n = r.u32()? as usize;
            r.take(n)
        }
        let mut r = crate::config::Reader(bytes);
        let version = std::str::from_utf8(take(&mut r)?).ok()?.to_owned();
        let modules = serde_json::from_slice(take(&mut r)?).ok()?;
        let mut section = || -> Option<Section> {
            (0..r.u32()?)
                .map(|_| {
                    let key = std::str::from_utf8(take(&mut r)?).ok()?;
                    let hash = r.u64()?;
                    let text = Box::from(take(&mut r)?);
                    Some((Box::from(key), Kept { text, hash }))
                })
                .collect()
        };
        let agents = section()?;
        let policies = section()?;
        r.0.is_empty().then_some(Self {
            version,
            modules,
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
        let agents = merge_section(&self.agents, bundle.data.agents);
        let policies = merge_section(&self.policies, bundle.data.policies);
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
            agents: owned(&bundle.data.agents),
            policies: owned(&bundle.data.policies),
        })
    }

    /// Makes these the entries of the configuration `changes` came from.
    pub fn apply(&mut self, changes: Changes) {
        for (section, list) in [
            (&mut self.agents, changes.agents),
            (&mut self.policies, changes.policies),
        ] {
            section.extend(list);
        }
        if let Some(modules) = changes.modules {
            self.modules = modules;
        }
        self.version = changes.version;
    }
}

/// Entries with their keys, owned (a [`Section`] or [`SectionChanges`]).
fn owned<C: FromIterator<(Box<str>, Kept)>>(entries: &[RawEntry<'_>]) -> C {
    entries
        .iter()
        .map(|e| (Box::from(&*e.key), kept(e)))
        .collect()
}

fn kept(e: &RawEntry<'_>) -> Kept {
    Kept {
        text: Box::from(e.text),
        hash: e.hash.unwrap_or_else(|| crate::data::text_hash(e.text)),
    }
}

/// One section of a merged configuration: the base's entries the delta leaves alone, then
/// the delta's.
fn merge_section<'x>(base: &'x Section, upserts: Vec<RawEntry<'x>>) -> Vec<RawEntry<'x>> {
    let touched: HashSet<&str> = upserts.iter().map(|e| &*e.key).collect();
    let mut merged: Vec<RawEntry<'x>> = Vec::with_capacity(base.len() + upserts.len());
    merged.extend(
        base.iter()
            .filter(|(key, _)| !touched.contains(&***key))
            .map(|(key, e)| RawEntry {
                key: Cow::Borrowed(key),
                text: &e.text,
                hash: Some(e.hash),
            }),
    );
    merged.extend(upserts);
    merged
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
            // The next canary reads them back as they were published.
            assert_eq!(
                Retained::decode(&retained.encode()).as_ref(),
                Some(&retained)
            );
            previous = full;
        }
        assert!(deltas > 20 && fulls > 3, "{deltas} deltas, {fulls} in full");
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
        assert!(Retained::decode(&encoded[..encoded.len() - 1]).is_none());
        assert!(Retained::decode(&[encoded.as_slice(), b"x"].concat()).is_none());
        assert!(Retained::decode(b"").is_none());

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
