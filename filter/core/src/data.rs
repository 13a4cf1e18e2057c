//! Validation and normalisation of the bundle's data document at configure time.
//!
//! Everything the Rego library relies on is checked here, so a broken bundle is refused
//! in `on_configure` (and by the control plane before rollout), never discovered on a
//! request: unknown condition fields or operators, bad regexes and CIDRs, windows out of
//! range, timezones without an offset table. Missing optional fields get their defaults
//! and rules are sorted (priority descending, then id) so Rego can take the first match.

use crate::config::RawData;
use crate::time::{DAYS, OffsetTable, tables_from_json};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

/// Request fields a condition may test; `agent_metadata.<key>` is accepted too.
pub const FIELDS: &[&str] = &[
    "domain",
    "method",
    "path",
    "user_agent",
    "source_ip",
    "hour",
    "minute",
    "day_of_week",
    "agent_name",
];

pub const OPERATORS: &[&str] = &[
    "equals",
    "not_equals",
    "in",
    "not_in",
    "contains",
    "starts_with",
    "ends_with",
    "matches",
    "cidr",
];

/// Which request facts decisions depend on (besides identity and domain): the
/// memoisation key holds exactly these, and a memoised decision lasts until [`Clock`]
/// says the time inputs may change it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reads {
    pub method: bool,
    pub path: bool,
    pub user_agent: bool,
    pub source_ip: bool,
    pub clock: Clock,
}

/// When decisions can change with the clock. Time inputs have minute resolution (local
/// minute of the day and day of the week per timezone, `unix_ns` at the start of the
/// minute), and the library reads them only through windows and time conditions, so a
/// decision holds until the next local minute at which a window opens or closes, a day
/// or hour condition can flip, or the timezone's UTC offset changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// Any minute may change a decision (a `minute` condition, or custom Rego, which may
    /// read any time input).
    pub every_minute: bool,
    /// Timezone → local minutes of the day (0..1440) at which a decision may change.
    pub boundaries: BTreeMap<String, BTreeSet<u16>>,
}

impl Reads {
    /// Everything (custom Rego may read any input field).
    pub fn all() -> Self {
        Self {
            method: true,
            path: true,
            user_agent: true,
            source_ip: true,
            clock: Clock {
                every_minute: true,
                boundaries: BTreeMap::new(),
            },
        }
    }

    fn merge(&mut self, other: &Self) {
        self.method |= other.method;
        self.path |= other.path;
        self.user_agent |= other.user_agent;
        self.source_ip |= other.source_ip;
        self.clock.every_minute |= other.clock.every_minute;
        for (tz, minutes) in &other.clock.boundaries {
            // Most policies share a timezone: its name is copied once.
            match self.clock.boundaries.get_mut(tz) {
                Some(set) => set.extend(minutes),
                None => {
                    self.clock.boundaries.insert(tz.clone(), minutes.clone());
                }
            }
        }
    }
}

impl Clock {
    /// Decisions may change at these local minutes of the day in `timezone` (and at
    /// midnight, when the day and the previous day change).
    fn add(&mut self, timezone: &str, minutes: impl IntoIterator<Item = u16>) {
        let set = self.boundaries.entry(timezone.to_owned()).or_default();
        set.insert(0);
        set.extend(minutes.into_iter().map(|m| m % 1440));
    }
}

/// A bundle's agents and policies, validated and converted to regorus values, each with
/// the hash of the JSON it came from. The compiled policy looks a request's agent and its
/// policies up here and hands them to Rego in the input (`input.bundle`), so the engine's
/// data document stays empty and a push never makes regorus re-prepare its modules.
#[derive(Debug, Default)]
pub struct Entries {
    /// Keyed by the lower-case fingerprint.
    agents: Arc<Section<AgentEntry>>,
    policies: Arc<Section<PolicyEntry>>,
}

/// The agents or the policies of a configuration: keyed for lookups, and listed in the
/// bundle's order. A later configuration whose list has the same keys in the same order
/// takes the section over as it is, or a copy with only its changed entries replaced (a
/// copy shares every entry), instead of building a new map: a policy push costs a
/// long-lived VM one comparison per agent, not a hash-map insertion per agent
/// (`on_configure` runs between requests on the worker thread).
#[derive(Debug)]
struct Section<E> {
    map: HashMap<Arc<str>, Arc<E>>,
    /// Each key as the bundle writes it, with its entry, in the bundle's order.
    order: Vec<(Arc<str>, Arc<E>)>,
}

impl<E> Default for Section<E> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: Vec::new(),
        }
    }
}

/// An entry's regorus value: prepared when the configuration is loaded, or, when a VM of
/// this Envoy validated the same JSON text already ([`Validated`]), on first use from
/// the text kept here. Entries are shared by the configurations of one VM that carry the
/// same JSON, so each is prepared at most once per VM.
#[derive(Debug)]
struct Lazy {
    value: OnceLock<Result<regorus::Value, String>>,
    /// The JSON of an entry prepared on first use.
    text: Option<Box<[u8]>>,
}

/// An agent: the hash of its JSON and its value.
#[derive(Debug)]
pub(crate) struct AgentEntry {
    hash: u64,
    value: Lazy,
}

/// A policy: the hash of its JSON, what it contributes besides its value, and its value.
#[derive(Debug)]
pub(crate) struct PolicyEntry {
    hash: u64,
    facts: PolicyFacts,
    id: Box<str>,
    value: Lazy,
    /// [`PolicyEntry::shape`], computed on first use.
    shape: OnceLock<Option<u64>>,
}

/// The agents' and policies' JSON texts (by [`EntryCache`] hash) that a VM of this Envoy
/// has validated, with each policy's [`PolicyFacts`]: a VM loading a configuration
/// validates only the entries not in it and prepares the others on first use. Envoy
/// loads every configuration first in a fresh VM on its main thread (its configuration
/// canary, which refuses a bad one); the canary publishes the set (the filter keeps it in
/// proxy-wasm shared data), so the worker VMs that load the same configuration next
/// validate nothing again, and the next canary validates only what the push changed.
/// Validating an entry depends on its text alone (and, for a policy, on its timezone
/// having an offset table, which is checked on every load).
///
/// Only the entries a load does not find unchanged in its VM's previous configuration are
/// looked up, so the shared form is read without parsing it: sorted hashes, and each
/// policy's facts as JSON parsed when its hash is looked up ([`Validated::encode`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Validated {
    agents: Vec<u64>,
    /// Policy hashes, sorted, each with the span of its facts' JSON in `facts`.
    policies: Vec<(u64, std::ops::Range<usize>)>,
    facts: Vec<u8>,
    /// Hashes of sets of Rego modules (the engine is checked once per set).
    modules: Vec<u64>,
}

/// The data document prepared, plus what the core needs next to it.
#[derive(Debug)]
pub struct PreparedValues {
    pub entries: Arc<Entries>,
    pub tables: BTreeMap<String, OffsetTable>,
    pub reads: Reads,
    pub custom_keys: BTreeSet<String>,
    /// Agents and policies this call validated itself (not reused, not in [`Validated`]).
    pub validated_here: (usize, usize),
}

/// What the previous configuration prepared, kept by a filter VM so that a policy push
/// only validates and converts the agents and policies that changed: an entry whose JSON
/// hashes the same as before (keyed by its fingerprint or id) is reused as is. The
/// compiled Rego modules are kept too ([`crate::policy::CompiledPolicy`]) and reused while
/// the bundle's modules stay the same. This is what keeps `on_configure` — which runs on
/// Envoy's worker threads, between requests — short for large bundles. An empty cache
/// prepares everything.
#[derive(Debug, Default)]
pub struct EntryCache {
    entries: Arc<Entries>,
    /// What `entries`' policies read and the custom modules they name (`gather`; an
    /// empty section's when there are none).
    gathered: (Reads, BTreeSet<String>),
    /// The modules of the previous configuration, and the engine prepared with them.
    pub(crate) engine: Option<Arc<crate::policy::Modules>>,
}

/// What a prepared policy contributes besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PolicyFacts {
    reads: Reads,
    custom: Option<String>,
    timezone: String,
}

// === impl Entries ===

impl Entries {
    /// The agent with this (lower-case) fingerprint; `None` for an unknown one, and for
    /// one whose entry failed to prepare on first use ([`Entries::problem`]).
    pub fn agent(&self, fingerprint: &str) -> Option<&regorus::Value> {
        self.agents.map.get(fingerprint)?.value().ok()
    }

    /// Why the entry of this agent or of a policy it names, prepared on first use, is
    /// unusable; `None` when all are usable, and for an unknown agent. Cannot happen
    /// while [`Validated`] only names texts that validated; a request of such an agent is
    /// an evaluation error, never a decision without the entry.
    pub fn problem(&self, fingerprint: &str) -> Option<String> {
        let agent = self.agents.map.get(fingerprint)?;
        let value = match agent.value() {
            Ok(value) => value,
            Err(e) => return Some(format!("agent {fingerprint}: {e}")),
        };
        self.named_policies(value).find_map(|(_, policy)| {
            let policy = policy?;
            let e = policy.value().err()?;
            Some(format!("policy {}: {e}", policy.id))
        })
    }

    /// This configuration's entries as validated, with its `modules` key if they are,
    /// in their shared form ([`Validated::decode`]); entries that failed on first use
    /// are left out.
    pub(crate) fn validated(&self, modules: Option<u64>) -> Vec<u8> {
        let usable = |value: &Lazy| value.value.get().is_none_or(Result::is_ok);
        let agents: Vec<u64> = self
            .agents
            .map
            .values()
            .filter(|entry| usable(&entry.value))
            .map(|entry| entry.hash)
            .collect();
        let policies: Vec<(u64, &PolicyFacts)> = self
            .policies
            .map
            .values()
            .filter(|entry| usable(&entry.value))
            .map(|entry| (entry.hash, &entry.facts))
            .collect();
        Validated::encode(agents, policies, modules.into_iter().collect())
    }

    /// What a decision about this agent depends on in the bundle, as one hash: its entry
    /// and the entries of the policies it names (`None` for an unknown fingerprint). Two
    /// configurations with the same modules, timezones and read fields decide the agent's
    /// requests alike when its signatures are equal.
    pub fn signature(&self, fingerprint: &str) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let entry = self.agents.map.get(fingerprint)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        entry.hash.hash(&mut h);
        if let Ok(value) = entry.value() {
            for (_, policy) in self.named_policies(value) {
                policy.map(|p| p.hash).hash(&mut h);
            }
        }
        Some(h.finish())
    }

    /// What a decision about this agent's requests for `domain` depends on in the
    /// bundle, as one hash: its entry, and for each policy it names, the policy without
    /// its domain sets and its priority, which of those sets list `domain` (the exact
    /// sets) or one of its strict parent suffixes (the suffix sets), and the rank of its
    /// priority among the agent's policies. The library reads a policy's domain sets only
    /// by those lookups (`verdict` in `rego/policies/chronoguard.rego`), and compares
    /// policies' priorities only with each other (`best`). So two configurations with
    /// the same modules, timezones and read fields decide the agent's requests for
    /// `domain` alike when these hashes are equal, even where the domain lists or the
    /// priorities changed: a push that edits domain lists keeps the memoised decisions of
    /// every other domain, and one that changes priorities without reordering the
    /// agent's policies keeps them all. `None` (compare [`Entries::signature`] instead)
    /// for an unknown agent, an unusable entry, and an agent with a policy that has
    /// custom Rego, which may read the domain sets in any way.
    pub fn domain_signature(&self, fingerprint: &str, domain: &str) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let entry = self.agents.map.get(fingerprint)?;
        let agent = entry.value().ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        entry.hash.hash(&mut h);
        let parents: Vec<regorus::Value> =
            parent_suffixes(domain).map(regorus::Value::from).collect();
        let exact = [regorus::Value::from(domain)];
        let mut priorities = Vec::new();
        for (_, policy) in self.named_policies(agent) {
            let Some(policy) = policy else {
                None::<u64>.hash(&mut h);
                priorities.push(None);
                continue;
            };
            if policy.facts.custom.is_some() {
                return None;
            }
            Some(policy.shape()?).hash(&mut h);
            let value = policy.value().ok()?;
            priorities.push(Some(value["priority"].as_i64().ok()?));
            for (set, suffixes) in DOMAIN_SETS {
                let keys = if suffixes { &parents[..] } else { &exact[..] };
                let listed = value[set].as_object().ok();
                for key in keys {
                    // Rego's lookup succeeds for a present value other than false (the
                    // sets hold only `true`).
                    let hit = listed
                        .and_then(|set| set.get(key))
                        .is_some_and(|v| *v != regorus::Value::Bool(false));
                    hit.hash(&mut h);
                }
            }
        }
        // Each priority's dense rank among the agent's policies': what `best` compares.
        let mut distinct: Vec<i64> = priorities.iter().flatten().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        for priority in priorities {
            priority
                .map(|p| distinct.partition_point(|d| *d < p))
                .hash(&mut h);
        }
        Some(h.finish())
    }

    /// The ids an agent's entry names, each with the bundle's entry for it (if any).
    pub(crate) fn named_policies<'a>(
        &'a self,
        agent: &'a regorus::Value,
    ) -> impl Iterator<Item = (&'a regorus::Value, Option<&'a PolicyEntry>)> {
        agent["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|id| {
                let entry = id
                    .as_string()
                    .ok()
                    .and_then(|id| self.policies.map.get(id.as_ref()))
                    .map(Arc::as_ref);
                (id, entry)
            })
    }

    /// The entries as the bundle's data document (`{agents, policies}`), for comparisons.
    #[cfg(test)]
    pub(crate) fn document(&self) -> regorus::Value {
        let agents: BTreeMap<_, _> = self
            .agents
            .map
            .iter()
            .filter_map(|(k, entry)| {
                Some((
                    regorus::Value::from(k.as_ref()),
                    entry.value().ok()?.clone(),
                ))
            })
            .collect();
        let policies: BTreeMap<_, _> = self
            .policies
            .map
            .iter()
            .filter_map(|(k, entry)| {
                Some((
                    regorus::Value::from(k.as_ref()),
                    entry.value().ok()?.clone(),
                ))
            })
            .collect();
        regorus::Value::from(BTreeMap::from([
            (regorus::Value::from("agents"), regorus::Value::from(agents)),
            (
                regorus::Value::from("policies"),
                regorus::Value::from(policies),
            ),
        ]))
    }
}

// === impl Lazy ===

impl Lazy {
    fn prepared(value: regorus::Value) -> Self {
        Self {
            value: OnceLock::from(Ok(value)),
            text: None,
        }
    }

    fn deferred(text: &[u8]) -> Self {
        Self {
            value: OnceLock::new(),
            text: Some(text.into()),
        }
    }

    /// The value, prepared now with `prepare` if it was deferred.
    fn get(
        &self,
        prepare: impl FnOnce(&Value) -> Result<Value, String>,
    ) -> Result<&regorus::Value, &str> {
        self.value
            .get_or_init(|| {
                let text = self.text.as_deref().unwrap_or(b"null");
                let value: Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
                to_regorus(prepare(&value)?)
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

impl AgentEntry {
    fn value(&self) -> Result<&regorus::Value, &str> {
        self.value.get(prepare_agent)
    }
}

impl PolicyEntry {
    pub(crate) fn value(&self) -> Result<&regorus::Value, &str> {
        // Its timezone's table was checked when the configuration was loaded.
        self.value
            .get(|v| prepare_policy(&self.id, v, &|_| true).map(|(value, _)| value))
    }

    /// The hash of the prepared policy without its domain sets ([`DOMAIN_SETS`]) and its
    /// priority (see [`Entries::domain_signature`]); `None` when its value is unusable.
    fn shape(&self) -> Option<u64> {
        *self.shape.get_or_init(|| {
            let mut object = self.value().ok()?.as_object().ok()?.clone();
            for key in DOMAIN_SETS
                .map(|(set, _)| set)
                .into_iter()
                .chain(["priority"])
            {
                object.remove(&regorus::Value::from(key));
            }
            let text = serde_json::to_vec(&regorus::Value::from(object)).ok()?;
            Some(text_hash(&text))
        })
    }
}

// === impl Validated ===

impl Validated {
    /// The shared form: the agents' hashes (a count, then each), the policies' (a count,
    /// then each with the length of its facts' JSON), the module sets' (a count, then
    /// each), then the policies' facts, each as JSON; integers little-endian, `u32`
    /// counts and lengths, `u64` hashes.
    pub(crate) fn encode(
        mut agents: Vec<u64>,
        policies: Vec<(u64, &PolicyFacts)>,
        modules: Vec<u64>,
    ) -> Vec<u8> {
        // Facts always serialise (strings, booleans and small integers).
        let facts: Vec<(u64, Vec<u8>)> = policies
            .iter()
            .map(|(hash, facts)| (*hash, serde_json::to_vec(facts).unwrap_or_default()))
            .collect();
        let facts: Vec<(u64, &[u8])> = facts.iter().map(|(h, json)| (*h, &json[..])).collect();
        Self::write(&mut agents, facts, modules)
    }

    /// The shared form of these hashes and facts' JSON (sorted and deduplicated here).
    fn write(
        agents: &mut Vec<u64>,
        mut policies: Vec<(u64, &[u8])>,
        mut modules: Vec<u64>,
    ) -> Vec<u8> {
        agents.sort_unstable();
        agents.dedup();
        policies.sort_unstable_by_key(|(hash, _)| *hash);
        policies.dedup_by_key(|(hash, _)| *hash);
        modules.sort_unstable();
        modules.dedup();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let mut bytes = Vec::with_capacity(
            12 + agents.len() * 8
                + policies.len() * 12
                + modules.len() * 8
                + policies.iter().map(|(_, json)| json.len()).sum::<usize>(),
        );
        bytes.extend(count(agents.len()));
        bytes.extend(agents.iter().flat_map(|h| h.to_le_bytes()));
        bytes.extend(count(policies.len()));
        for (hash, json) in &policies {
            bytes.extend(hash.to_le_bytes());
            bytes.extend(count(json.len()));
        }
        bytes.extend(count(modules.len()));
        bytes.extend(modules.iter().flat_map(|h| h.to_le_bytes()));
        policies.iter().for_each(|(_, json)| bytes.extend(*json));
        bytes
    }

    /// The shared form of these entries and `added`'s, of those whose hashes are listed
    /// in `agents` and `policies` (a configuration's), with both's module sets: what a
    /// VM publishes after validating a delta's own entries against this set
    /// (`crate::policy::CompiledPolicy::check_delta`). The facts are copied as they are.
    pub(crate) fn extended(&self, added: &Validated, agents: &[u64], policies: &[u64]) -> Vec<u8> {
        let mut kept: Vec<u64> = agents
            .iter()
            .copied()
            .filter(|h| added.agent(*h) || self.agent(*h))
            .collect();
        let facts: Vec<(u64, &[u8])> = policies
            .iter()
            .filter_map(|h| Some((*h, added.facts_json(*h).or_else(|| self.facts_json(*h))?)))
            .collect();
        let modules = self.modules.iter().chain(&added.modules).copied().collect();
        Self::write(&mut kept, facts, modules)
    }

    /// Reads the shared form ([`Validated::encode`]) without parsing any policy's facts;
    /// what cannot be read counts as not validated.
    pub fn decode(bytes: &[u8]) -> Self {
        Self::read(bytes).unwrap_or_default()
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        let mut r = crate::config::Reader(bytes);
        let hashes = |r: &mut crate::config::Reader<'_>| -> Option<Vec<u64>> {
            let n = r.u32()?;
            (0..n).map(|_| r.u64()).collect()
        };
        let mut agents = hashes(&mut r)?;
        let n = r.u32()?;
        let mut policies = Vec::new();
        let mut at = 0usize;
        for _ in 0..n {
            let (hash, len) = (r.u64()?, r.u32()? as usize);
            policies.push((hash, at..at.checked_add(len)?));
            at += len;
        }
        let modules = hashes(&mut r)?;
        let facts = r.0.get(..at)?.to_vec();
        // Written sorted; sorted again so that a lookup never misses by a writer's fault.
        agents.sort_unstable();
        policies.sort_unstable_by_key(|(hash, _)| *hash);
        Some(Self {
            agents,
            policies,
            facts,
            modules,
        })
    }

    /// Whether the set of Rego modules with this key is validated.
    pub(crate) fn modules(&self, key: u64) -> bool {
        self.modules.contains(&key)
    }

    fn agent(&self, hash: u64) -> bool {
        self.agents.binary_search(&hash).is_ok()
    }

    /// The facts of the validated policy whose text has this hash.
    fn policy(&self, hash: u64) -> Option<PolicyFacts> {
        serde_json::from_slice(self.facts_json(hash)?).ok()
    }

    /// The timezone of the validated policy whose text has this hash (its facts' other
    /// fields skipped, not built).
    pub(crate) fn timezone(&self, hash: u64) -> Option<String> {
        #[derive(Deserialize)]
        struct Timezone {
            timezone: String,
        }
        let facts: Timezone = serde_json::from_slice(self.facts_json(hash)?).ok()?;
        Some(facts.timezone)
    }

    /// The JSON of the facts of the validated policy whose text has this hash.
    fn facts_json(&self, hash: u64) -> Option<&[u8]> {
        let at = self
            .policies
            .binary_search_by_key(&hash, |(h, _)| *h)
            .ok()?;
        self.facts.get(self.policies.get(at)?.1.clone())
    }

    /// How many agents, policies and module sets.
    pub fn len(&self) -> (usize, usize, usize) {
        (self.agents.len(), self.policies.len(), self.modules.len())
    }
}

/// Validates and normalises `data` into regorus values (the error names the agent,
/// policy or rule at fault), reusing unchanged entries from `cache`. On success `cache`
/// holds this document's entries; on failure it is left as it was.
pub fn prepare_values(data: &Value, cache: &mut EntryCache) -> Result<PreparedValues, String> {
    prepare_all(Doc::object(data)?, cache, &Validated::default())
}

/// [`prepare_values`] for a document whose entries are still JSON text (the filter's
/// `on_configure`): an entry whose text is unchanged is neither parsed nor prepared, and
/// an entry whose text is in `validated` is prepared on first use.
pub fn prepare_raw(
    data: &RawData<'_>,
    cache: &mut EntryCache,
    validated: &Validated,
) -> Result<PreparedValues, String> {
    prepare_all(Doc::Raw(data), cache, validated)
}

/// [`prepare_raw`] for a delta (`crate::delta`): `data` lists only the agents and
/// policies added or changed since the configuration whose entries `cache` holds, and
/// the timezones in full. A section the delta leaves alone is taken over as it is, and
/// in the others only the listed entries are looked at, so a push costs a long-lived VM
/// what it changed, not a visit to every entry. The caller makes sure `cache` holds the
/// delta's base. `Ok(None)` when it cannot be done this way: a policy the delta leaves
/// alone lost its timezone's table, and preparing it again (to refuse it) needs its
/// text; load the merged configuration with [`prepare_raw`] instead.
pub fn prepare_raw_delta(
    data: &RawData<'_>,
    cache: &mut EntryCache,
    validated: &Validated,
) -> Result<Option<PreparedValues>, String> {
    prepare_doc(Doc::Raw(data), cache, validated, Listed::Changes)
}

/// What a document lists of the entries of the configuration it describes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    All,
    /// Only those added or changed since the configuration of the [`EntryCache`].
    Changes,
}

/// A whole document (`prepare_doc` gives up only on a delta).
fn prepare_all(
    doc: Doc<'_>,
    cache: &mut EntryCache,
    validated: &Validated,
) -> Result<PreparedValues, String> {
    prepare_doc(doc, cache, validated, Listed::All)?
        .ok_or_else(|| "a whole document was taken for a delta".to_owned())
}

fn prepare_doc(
    doc: Doc<'_>,
    cache: &mut EntryCache,
    validated: &Validated,
    listed: Listed,
) -> Result<Option<PreparedValues>, String> {
    let mut validated_here = (0, 0);
    let old = &cache.entries;
    let (tables, agents, policies) = doc.parts()?;
    // The timezone's table may have gone from the bundle since.
    let has_table = |tz: &str| tables.contains_key(tz);
    if listed == Listed::Changes
        && old
            .policies
            .map
            .values()
            .any(|entry| !has_table(&entry.facts.timezone))
    {
        return Ok(None);
    }
    let agents = Section::update(
        &old.agents,
        "agent",
        &agents,
        listed,
        |fingerprint| {
            if fingerprint.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(fingerprint.to_ascii_lowercase())
            } else {
                Cow::Borrowed(fingerprint)
            }
        },
        |_| true,
        |_, raw, hash| {
            if let Json::Text(text, _) = raw
                && validated.agent(hash)
            {
                return Ok(AgentEntry {
                    hash,
                    value: Lazy::deferred(text),
                });
            }
            validated_here.0 += 1;
            let value = to_regorus(raw.with_value(prepare_agent)?)?;
            Ok(AgentEntry {
                hash,
                value: Lazy::prepared(value),
            })
        },
    )?;
    let policies = Section::update(
        &old.policies,
        "policy",
        &policies,
        listed,
        |id| Cow::Borrowed(id),
        |entry| has_table(&entry.facts.timezone),
        |id, raw, hash| {
            if let Json::Text(text, _) = raw
                && let Some(facts) = validated.policy(hash)
                && has_table(&facts.timezone)
            {
                return Ok(PolicyEntry {
                    hash,
                    facts,
                    id: id.into(),
                    value: Lazy::deferred(text),
                    shape: OnceLock::new(),
                });
            }
            validated_here.1 += 1;
            let (value, facts) = raw.with_value(|v| prepare_policy(id, v, &has_table))?;
            Ok(PolicyEntry {
                hash,
                facts,
                id: id.into(),
                value: Lazy::prepared(to_regorus(value)?),
                shape: OnceLock::new(),
            })
        },
    )?;
    // A push that leaves the policies alone leaves what they read alone.
    let (reads, custom_keys) = if Arc::ptr_eq(&policies, &old.policies) {
        cache.gathered.clone()
    } else {
        gather(policies.map.values().map(|entry| &entry.facts))
    };
    let entries = Arc::new(Entries { agents, policies });
    cache.entries = entries.clone();
    cache.gathered = (reads.clone(), custom_keys.clone());
    Ok(Some(PreparedValues {
        entries,
        tables,
        reads,
        custom_keys,
        validated_here,
    }))
}

/// An entry's hash, whatever its kind.
trait Hashed {
    fn content_hash(&self) -> u64;
}

impl Hashed for AgentEntry {
    fn content_hash(&self) -> u64 {
        self.hash
    }
}

impl Hashed for PolicyEntry {
    fn content_hash(&self) -> u64 {
        self.hash
    }
}

// === impl Section ===

impl<E: Hashed> Section<E> {
    /// The section of the entries `new` (each key as the bundle writes it, with its
    /// JSON), reusing `old`'s entry wherever the key and the hash of the JSON are
    /// unchanged and `reusable` agrees; `make` builds the others. Entries are looked up
    /// by `lookup_key` of their key; of two entries with the same lookup key, the later
    /// one counts. With [`Listed::Changes`], `new` holds only the entries added or
    /// changed since `old`, and `old`'s others stay (`reusable` is the caller's to check
    /// for them). Errors name the entry (`<kind> <key>: ...`).
    fn update(
        old: &Arc<Self>,
        kind: &str,
        new: &[(&str, Json<'_>)],
        listed: Listed,
        lookup_key: impl for<'k> Fn(&'k str) -> Cow<'k, str>,
        reusable: impl Fn(&E) -> bool,
        mut make: impl FnMut(&str, Json<'_>, u64) -> Result<E, String>,
    ) -> Result<Arc<Self>, String> {
        let mut make = |key: &str, json: Json<'_>, hash: u64| {
            make(key, json, hash)
                .map(Arc::new)
                .map_err(|e| format!("{kind} {key}: {e}"))
        };
        if listed == Listed::Changes {
            if new.is_empty() {
                return Ok(old.clone());
            }
            let mut section = Self {
                map: old.map.clone(),
                order: old.order.clone(),
            };
            for (key, json) in new {
                let hash = json.hash();
                let lookup = lookup_key(key);
                let previous = section
                    .map
                    .get_key_value(lookup.as_ref())
                    .map(|(k, entry)| (k.clone(), entry.clone()));
                let entry = match &previous {
                    Some((_, entry)) if entry.content_hash() == hash && reusable(entry) => {
                        entry.clone()
                    }
                    _ => make(key, *json, hash)?,
                };
                let written: Arc<str> = Arc::from(*key);
                match previous {
                    Some((lookup, replaced)) => {
                        // In the bundle's order where it was.
                        match section
                            .order
                            .iter_mut()
                            .find(|(_, e)| Arc::ptr_eq(e, &replaced))
                        {
                            Some(slot) => *slot = (written, entry.clone()),
                            None => section.order.push((written, entry.clone())),
                        }
                        section.map.insert(lookup, entry);
                    }
                    None => {
                        section.order.push((written, entry.clone()));
                        section.map.insert(Arc::from(lookup.as_ref()), entry);
                    }
                }
            }
            return Ok(Arc::new(section));
        }
        // The same keys in the same order, none twice: the old section with the changed
        // entries replaced (no new map, no key hashed but the changed ones').
        let same_keys = old.map.len() == old.order.len()
            && old.order.len() == new.len()
            && old
                .order
                .iter()
                .zip(new)
                .all(|((written, _), (key, _))| same_bytes(written.as_bytes(), key.as_bytes()));
        if same_keys {
            let mut changed: Option<Self> = None;
            for (at, ((key, json), (_, entry))) in new.iter().zip(&old.order).enumerate() {
                let hash = json.hash();
                if entry.content_hash() == hash && reusable(entry) {
                    continue;
                }
                let fresh = make(key, *json, hash)?;
                let section = changed.get_or_insert_with(|| Self {
                    map: old.map.clone(),
                    order: old.order.clone(),
                });
                if let Some(slot) = section.map.get_mut(lookup_key(key).as_ref()) {
                    *slot = fresh.clone();
                }
                if let Some(slot) = section.order.get_mut(at) {
                    slot.1 = fresh;
                }
            }
            return Ok(changed.map_or_else(|| old.clone(), Arc::new));
        }
        let mut map = HashMap::with_capacity(new.len());
        let mut order = Vec::with_capacity(new.len());
        for (key, json) in new {
            let hash = json.hash();
            let lookup = lookup_key(key);
            // The old key is shared rather than allocated again.
            let (lookup, previous) = match old.map.get_key_value(lookup.as_ref()) {
                Some((k, entry)) => (k.clone(), Some(entry)),
                None => (Arc::<str>::from(lookup.as_ref()), None),
            };
            let entry = match previous {
                Some(entry) if entry.content_hash() == hash && reusable(entry) => entry.clone(),
                _ => make(key, *json, hash)?,
            };
            let written = if *lookup == **key {
                lookup.clone()
            } else {
                Arc::from(*key)
            };
            order.push((written, entry.clone()));
            map.insert(lookup, entry);
        }
        Ok(Arc::new(Self { map, order }))
    }
}

/// An entry's JSON: parsed already (the control plane's bundles) or still text (the
/// filter's configuration).
#[derive(Clone, Copy)]
enum Json<'a> {
    Value(&'a Value),
    /// The text, and its hash when known already.
    Text(&'a [u8], Option<u64>),
}

impl Json<'_> {
    /// The [`EntryCache`] key of the content (the two forms never share a cache).
    fn hash(self) -> u64 {
        match self {
            Json::Value(value) => json_hash(value),
            Json::Text(text, known) => known.unwrap_or_else(|| text_hash(text)),
        }
    }

    /// Runs `f` on the parsed entry (parsing text first).
    fn with_value<T>(self, f: impl FnOnce(&Value) -> Result<T, String>) -> Result<T, String> {
        match self {
            Json::Value(value) => f(value),
            Json::Text(text, _) => {
                let value: Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
                f(&value)
            }
        }
    }
}

/// The [`EntryCache`] (and [`Validated`]) hash of an entry's JSON text: the fast hash of
/// the configuration index (every entry of a configuration is hashed while it is parsed,
/// ≈ 430 KB for 1,000 agents; SipHash took a quarter of a fresh VM's load).
pub fn text_hash(text: &[u8]) -> u64 {
    crate::config::bytes_hash(text)
}

/// A data document to prepare.
enum Doc<'a> {
    Value(&'a Map<String, Value>),
    Raw(&'a RawData<'a>),
}

impl<'a> Doc<'a> {
    fn object(data: &'a Value) -> Result<Self, String> {
        Ok(Doc::Value(
            data.as_object().ok_or("data must be an object")?,
        ))
    }
}

/// Byte equality a word at a time: the filter's target compares bytes with wasi-libc's
/// `memcmp`, one byte per step (a load compares every agent's key with the previous one's,
/// a memoised decision its request's fingerprint).
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().unwrap_or_default());
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    a.len() == b.len()
        && x.by_ref().zip(y.by_ref()).all(|(x, y)| word(x) == word(y))
        && x.remainder() == y.remainder()
}

/// The timezones' offset tables, the agents and the policies of a document, each entry
/// with its key as written.
type Parts<'a> = (
    BTreeMap<String, OffsetTable>,
    Vec<(&'a str, Json<'a>)>,
    Vec<(&'a str, Json<'a>)>,
);

impl<'a> Doc<'a> {
    fn parts(self) -> Result<Parts<'a>, String> {
        match self {
            Doc::Value(object) => {
                let entries = |key: &str| -> Result<Vec<(&'a str, Json<'a>)>, String> {
                    Ok(object_field(object, key)?
                        .into_iter()
                        .map(|(k, v)| (k.as_str(), Json::Value(v)))
                        .collect())
                };
                Ok((
                    tables_from_json(object.get("timezones"))?,
                    entries("agents")?,
                    entries("policies")?,
                ))
            }
            Doc::Raw(data) => {
                let entries = |list: &'a [crate::config::RawEntry<'a>]| {
                    list.iter()
                        .map(|e| (e.key.as_ref(), Json::Text(e.text, e.hash)))
                        .collect()
                };
                Ok((
                    tables_from_json(data.timezones.as_ref())?,
                    entries(&data.agents),
                    entries(&data.policies),
                ))
            }
        }
    }
}

/// The document-wide reads and custom modules from the policies' contributions.
fn gather<'a>(facts: impl Iterator<Item = &'a PolicyFacts>) -> (Reads, BTreeSet<String>) {
    let mut reads = Reads::default();
    let mut custom_keys = BTreeSet::new();
    for f in facts {
        reads.merge(&f.reads);
        custom_keys.extend(f.custom.iter().cloned());
    }
    if !custom_keys.is_empty() {
        // Custom Rego may read any input field.
        reads = Reads::all();
    }
    (reads, custom_keys)
}

/// A regorus value of a prepared entry.
fn to_regorus(value: Value) -> Result<regorus::Value, String> {
    <regorus::Value as serde::Deserialize>::deserialize(value).map_err(|e| e.to_string())
}

/// A hash of a JSON value's content (SipHash over a tagged walk), for [`EntryCache`].
fn json_hash(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn walk(value: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match value {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(items) => {
                (4u8, items.len()).hash(h);
                items.iter().for_each(|v| walk(v, h));
            }
            Value::Object(map) => {
                (5u8, map.len()).hash(h);
                for (k, v) in map {
                    k.hash(h);
                    walk(v, h);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    walk(value, &mut h);
    h.finish()
}

fn object_field<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<Vec<(&'a String, &'a Value)>, String> {
    match object.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => Ok(map.iter().collect()),
        Some(_) => Err(format!("{key} must be an object")),
    }
}

fn prepare_agent(agent: &Value) -> Result<Value, String> {
    let a = agent.as_object().ok_or("must be an object")?;
    let status = str_field(a, "status")?;
    if !["pending", "active", "suspended", "deactivated"].contains(&status) {
        return Err(format!("unknown status {status:?}"));
    }
    let policies = match a.get("policies") {
        None => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|id| {
                id.as_str()
                    .map(str::to_owned)
                    .ok_or("policies must be strings")
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("policies must be an array".into()),
    };
    let metadata = match a.get("metadata") {
        None | Some(Value::Null) => json!({}),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(_) => return Err("metadata must be an object".into()),
    };
    Ok(json!({
        "id": a.get("id").cloned().unwrap_or(Value::Null),
        "tenant_id": a.get("tenant_id").cloned().unwrap_or(Value::Null),
        "name": a.get("name").and_then(Value::as_str).unwrap_or_default(),
        "status": status,
        "policies": policies,
        "metadata": metadata,
    }))
}

/// `has_table` tells whether the bundle has an offset table for a timezone.
fn prepare_policy(
    id: &str,
    policy: &Value,
    has_table: &dyn Fn(&str) -> bool,
) -> Result<(Value, PolicyFacts), String> {
    let mut facts = PolicyFacts::default();
    let reads = &mut facts.reads;
    let p = policy.as_object().ok_or("must be an object")?;
    if let Some(old) = ["allowed_domains", "blocked_domains"]
        .into_iter()
        .find(|k| p.contains_key(*k))
    {
        return Err(format!(
            "{old} is not read: domains arrive indexed as allowed_exact/allowed_suffix and blocked_exact/blocked_suffix (docs/contracts.md)"
        ));
    }
    let priority = p
        .get("priority")
        .map_or(Some(0), Value::as_i64)
        .ok_or("priority must be an integer")?;
    let status = p.get("status").and_then(Value::as_str).unwrap_or("active");
    if !["draft", "active", "archived"].contains(&status) {
        return Err(format!("unknown status {status:?}"));
    }
    let mode = p.get("mode").and_then(Value::as_str).unwrap_or("enforce");
    if !["enforce", "dry_run"].contains(&mode) {
        return Err(format!("unknown mode {mode:?}"));
    }
    let timezone = p.get("timezone").and_then(Value::as_str).unwrap_or("UTC");
    if !has_table(timezone) {
        return Err(format!(
            "timezone {timezone:?} has no offset table in the bundle"
        ));
    }
    let windows = match p.get("windows") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ws)) => ws
            .iter()
            .enumerate()
            .map(|(i, w)| window(w).map_err(|e| format!("window {i}: {e}")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("windows must be an array".into()),
    };
    let edges = windows.iter().flat_map(|w| {
        ["start", "end"].map(|k| w[k].as_u64().map_or(0, |m| u16::try_from(m).unwrap_or(0)))
    });
    if !windows.is_empty() {
        reads.clock.add(timezone, edges);
    }
    let mut rules = match p.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rs)) => rs
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r, reads, timezone))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("rules must be an array".into()),
    };
    rules.sort_by(|a, b| {
        let key = |r: &Value| {
            (
                -r["priority"].as_i64().unwrap_or(0),
                r["id"].as_str().unwrap_or_default().to_owned(),
            )
        };
        key(a).cmp(&key(b))
    });
    let rate_limit = match p.get("rate_limit") {
        None | Some(Value::Null) => Value::Null,
        Some(r) => rate_limit(r)?,
    };
    let custom = match p.get("custom") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(key))
            if !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            facts.custom = Some(key.clone());
            Value::String(key.clone())
        }
        Some(_) => return Err("custom must be a module key of [a-z0-9_]".into()),
    };
    facts.timezone = timezone.to_owned();
    let value = json!({
        "id": id,
        "tenant_id": p.get("tenant_id").cloned().unwrap_or(Value::Null),
        "name": p.get("name").and_then(Value::as_str).unwrap_or_default(),
        "priority": priority,
        "status": status,
        "mode": mode,
        "timezone": timezone,
        "windows": windows,
        "rules": rules,
        "rate_limit": rate_limit,
        "custom": custom,
        "allowed_exact": domain_set(p.get("allowed_exact"), "allowed_exact")?,
        "allowed_suffix": domain_set(p.get("allowed_suffix"), "allowed_suffix")?,
        "blocked_exact": domain_set(p.get("blocked_exact"), "blocked_exact")?,
        "blocked_suffix": domain_set(p.get("blocked_suffix"), "blocked_suffix")?,
    });
    Ok((value, facts))
}

/// A prepared policy's domain sets, each with whether Rego looks the request domain's
/// strict parent suffixes up in it (the suffix sets) or the domain itself (the exact
/// sets).
const DOMAIN_SETS: [(&str, bool); 4] = [
    ("allowed_exact", false),
    ("allowed_suffix", true),
    ("blocked_exact", false),
    ("blocked_suffix", true),
];

/// A policy's domain patterns indexed for the request path: exact names, and the suffixes
/// of `*.suffix` wildcards (`*.example.org` → `example.org`), each an object keyed by name
/// with `true` values. Rego looks the request's domain and its parent suffixes up in them
/// instead of scanning pattern lists. Patterns are expected normalised (lower case, no
/// trailing dot), as the control plane stores them.
pub fn index_domains(patterns: &[String]) -> (Map<String, Value>, Map<String, Value>) {
    let (mut exact, mut suffix) = (Map::new(), Map::new());
    for pattern in patterns {
        match pattern.strip_prefix("*.") {
            Some(parent) => suffix.insert(parent.to_owned(), Value::Bool(true)),
            None => exact.insert(pattern.clone(), Value::Bool(true)),
        };
    }
    (exact, suffix)
}

/// A domain's strict parent suffixes, what follows each dot (`domain_suffixes` in Rego):
/// `a.b.example.com` → `b.example.com`, `example.com`, `com`.
pub(crate) fn parent_suffixes(domain: &str) -> impl Iterator<Item = &str> {
    domain
        .match_indices('.')
        .filter_map(|(at, _)| domain.get(at + 1..))
}

/// Whether a domain set may hold `name`: letters, digits, hyphens and inner dots.
pub(crate) fn domain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// One domain index (`allowed_exact`, ...): an object of lower-case names → `true`.
fn domain_set(value: Option<&Value>, key: &str) -> Result<Value, String> {
    let entries = match value {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::Object(entries)) => entries,
        Some(_) => return Err(format!("{key} must be an object of domain names")),
    };
    let mut out = Map::new();
    for (name, flag) in entries {
        if flag != &Value::Bool(true) {
            return Err(format!("{key}.{name} must be true"));
        }
        if !domain_name(name) {
            return Err(format!(
                "{key} holds {name:?}, which is not a domain name (wildcards go in *_suffix without \"*.\")"
            ));
        }
        out.insert(name.to_ascii_lowercase(), Value::Bool(true));
    }
    Ok(Value::Object(out))
}

fn window(w: &Value) -> Result<Value, String> {
    let w = w.as_object().ok_or("must be an object")?;
    let days = strings(w.get("days"), "days")?;
    if days.is_empty() {
        return Err("days must not be empty".into());
    }
    if let Some(bad) = days.iter().find(|d| !DAYS.contains(&d.as_str())) {
        return Err(format!("unknown day {bad:?} (use mon..sun)"));
    }
    let minute = |key: &str, max: i64| {
        w.get(key)
            .and_then(Value::as_i64)
            .filter(|m| (0..=max).contains(m))
            .ok_or_else(|| format!("{key} must be a minute of the day (0..={max})"))
    };
    let (start, end) = (minute("start", 1439)?, minute("end", 1440)?);
    if start == end {
        return Err("start and end must differ".into());
    }
    Ok(json!({"days": days, "start": start, "end": end}))
}

fn rule(index: usize, r: &Value, reads: &mut Reads, timezone: &str) -> Result<Value, String> {
    let r = r
        .as_object()
        .ok_or_else(|| format!("rule {index} must be an object"))?;
    let id = r
        .get("id")
        .and_then(Value::as_str)
        .map_or_else(|| format!("rule-{index}"), str::to_owned);
    let err = |e: String| format!("rule {id}: {e}");
    let priority = r
        .get("priority")
        .map_or(Some(0), Value::as_i64)
        .ok_or_else(|| err("priority must be an integer".into()))?;
    let action = r.get("action").and_then(Value::as_str).unwrap_or_default();
    if action != "allow" && action != "deny" {
        return Err(err(format!("action must be allow or deny, not {action:?}")));
    }
    let conditions = match r.get("conditions") {
        None => Vec::new(),
        Some(Value::Array(cs)) => cs
            .iter()
            .map(|c| condition(c, reads, timezone).map_err(&err))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err("conditions must be an array".into())),
    };
    Ok(json!({"id": id, "priority": priority, "action": action, "conditions": conditions}))
}

fn condition(c: &Value, reads: &mut Reads, timezone: &str) -> Result<Value, String> {
    let c = c.as_object().ok_or("condition must be an object")?;
    let field = str_field(c, "field")?;
    let operator = str_field(c, "operator")?;
    let value = c.get("value").ok_or("condition needs a value")?;
    let metadata = field
        .strip_prefix("agent_metadata.")
        .is_some_and(|k| !k.is_empty());
    if !FIELDS.contains(&field) && !metadata {
        return Err(format!("unknown condition field {field:?}"));
    }
    if !OPERATORS.contains(&operator) {
        return Err(format!("unknown condition operator {operator:?}"));
    }
    match field {
        "method" => reads.method = true,
        "path" => reads.path = true,
        "user_agent" => reads.user_agent = true,
        "source_ip" => reads.source_ip = true,
        "minute" => reads.clock.every_minute = true,
        "hour" => reads.clock.add(timezone, (0..24).map(|h| h * 60)),
        "day_of_week" => reads.clock.add(timezone, []),
        _ => {}
    }
    let mut value = value.clone();
    match operator {
        "in" | "not_in" if !value.is_array() => {
            return Err(format!("operator {operator} needs an array value"));
        }
        "contains" | "starts_with" | "ends_with" | "matches" | "cidr" if !value.is_string() => {
            return Err(format!("operator {operator} needs a string value"));
        }
        "matches" => {
            let pattern = value.as_str().unwrap_or_default();
            regex::Regex::new(pattern).map_err(|e| format!("invalid regex {pattern:?}: {e}"))?;
        }
        "cidr" => {
            let cidr = value.as_str().unwrap_or_default();
            if !valid_cidr(cidr) {
                return Err(format!("invalid CIDR {cidr:?}"));
            }
        }
        _ => {}
    }
    // The filter normalises these facts; compare like with like.
    if field == "method" {
        value = upper(value);
    }
    if field == "domain" {
        value = lower(value);
    }
    Ok(json!({"field": field, "operator": operator, "value": value}))
}

fn upper(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.to_ascii_uppercase()),
        Value::Array(a) => Value::Array(a.into_iter().map(upper).collect()),
        other => other,
    }
}

fn lower(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.to_ascii_lowercase()),
        Value::Array(a) => Value::Array(a.into_iter().map(lower).collect()),
        other => other,
    }
}

fn valid_cidr(cidr: &str) -> bool {
    let Some((ip, prefix)) = cidr.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

fn rate_limit(r: &Value) -> Result<Value, String> {
    let r = r.as_object().ok_or("rate_limit must be an object")?;
    let mut out = Map::new();
    for key in ["per_minute", "per_hour", "per_day", "burst"] {
        match r.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                    .ok_or_else(|| format!("rate_limit.{key} must be a positive integer"))?;
                out.insert(key.into(), json!(n));
            }
        }
    }
    if let Some(unknown) = r
        .keys()
        .find(|k| !["per_minute", "per_hour", "per_day", "burst"].contains(&k.as_str()))
    {
        return Err(format!("unknown rate_limit field {unknown:?}"));
    }
    if !["per_minute", "per_hour", "per_day"]
        .iter()
        .any(|k| out.contains_key(*k))
    {
        return Err("rate_limit needs per_minute, per_hour or per_day".into());
    }
    Ok(Value::Object(out))
}

fn str_field<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{key} must be a string"))
}

fn strings(value: Option<&Value>, key: &str) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{key} must hold strings"))
            })
            .collect(),
        Some(_) => Err(format!("{key} must be an array of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prepared document as JSON (for assertions), with its document-wide facts.
    #[derive(Debug)]
    struct Prepared {
        data: Value,
        reads: Reads,
    }

    fn prepare(data: &Value) -> Result<Prepared, String> {
        let prepared = prepare_values(data, &mut EntryCache::default())?;
        Ok(Prepared {
            data: serde_json::to_value(prepared.entries.document()).map_err(|e| e.to_string())?,
            reads: prepared.reads,
        })
    }

    fn policy(extra: Value) -> Value {
        let mut p = json!({"id": "p", "priority": 1, "status": "active"});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        json!({"policies": {"p": p}})
    }

    #[test]
    fn defaults_are_filled_and_rules_sorted() {
        let prepared = prepare(&policy(json!({"rules": [
            {"id": "b", "priority": 1, "action": "allow", "conditions": []},
            {"id": "a", "priority": 1, "action": "deny", "conditions": [{"field": "method", "operator": "in", "value": ["get"]}]},
            {"id": "c", "priority": 5, "action": "deny"}
        ]}))).unwrap();
        let p = &prepared.data["policies"]["p"];
        assert_eq!(p["timezone"], "UTC");
        assert_eq!(p["mode"], "enforce");
        let ids: Vec<_> = p["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["c", "a", "b"]);
        assert_eq!(p["rules"][1]["conditions"][0]["value"], json!(["GET"]));
        assert!(prepared.reads.method && !prepared.reads.path);
    }

    #[test]
    fn domains_are_indexed_by_exact_name_and_wildcard_suffix() {
        let patterns = ["b.example", "*.c.example", "a.example", "*.a.example"]
            .map(str::to_owned)
            .to_vec();
        let (exact, suffix) = index_domains(&patterns);
        assert_eq!(
            Value::Object(exact),
            json!({"a.example": true, "b.example": true})
        );
        assert_eq!(
            Value::Object(suffix),
            json!({"a.example": true, "c.example": true})
        );
        let prepared = prepare(&policy(json!({"allowed_exact": {"A.Example": true}}))).unwrap();
        let p = &prepared.data["policies"]["p"];
        assert_eq!(p["allowed_exact"], json!({"a.example": true}));
        assert_eq!(p["blocked_suffix"], json!({}));
    }

    #[test]
    fn configuration_errors_name_the_problem() {
        for (extra, needle) in [
            (
                json!({"rules": [{"id": "r", "action": "allow", "conditions": [{"field": "colour", "operator": "equals", "value": 1}]}]}),
                "unknown condition field",
            ),
            (
                json!({"rules": [{"id": "r", "action": "allow", "conditions": [{"field": "path", "operator": "like", "value": "x"}]}]}),
                "unknown condition operator",
            ),
            (
                json!({"rules": [{"id": "r", "action": "allow", "conditions": [{"field": "path", "operator": "matches", "value": "("}]}]}),
                "invalid regex",
            ),
            (
                json!({"rules": [{"id": "r", "action": "allow", "conditions": [{"field": "source_ip", "operator": "cidr", "value": "10.0.0.0/33"}]}]}),
                "invalid CIDR",
            ),
            (
                json!({"rules": [{"id": "r", "action": "maybe"}]}),
                "action must be",
            ),
            (json!({"timezone": "Europe/Paris"}), "no offset table"),
            (
                json!({"windows": [{"days": ["mon"], "start": 60, "end": 60}]}),
                "must differ",
            ),
            (
                json!({"windows": [{"days": ["monday"], "start": 0, "end": 60}]}),
                "unknown day",
            ),
            (json!({"rate_limit": {"burst": 5}}), "needs per_minute"),
            (json!({"rate_limit": {"per_minute": 0}}), "positive integer"),
            (json!({"custom": "Bad-Key"}), "module key"),
            (json!({"allowed_exact": ["a.example"]}), "must be an object"),
            (json!({"allowed_exact": {"a.example": 1}}), "must be true"),
            (
                json!({"blocked_suffix": {"*.a.example": true}}),
                "not a domain name",
            ),
            (
                json!({"allowed_domains": ["a.example"]}),
                "allowed_domains is not read",
            ),
        ] {
            let err = prepare(&policy(extra.clone())).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
            assert!(err.starts_with("policy p"), "{err}");
        }
    }

    /// Entries whose text another VM validated are prepared on first use, and prepared
    /// like eager ones; one that then fails to prepare (the set named a text that does
    /// not validate) is a problem for the requests of the agents it concerns, not an
    /// unknown agent or policy, and is not published again.
    #[test]
    fn entries_validated_elsewhere_are_prepared_on_first_use() {
        let text = r#"{"agents": {
            "AB": {"status": "active", "name": "a", "policies": ["p"]},
            "cd": {"status": "sometimes", "name": "c"},
            "ef": {"status": "active", "name": "e", "policies": ["q"]}
        }, "policies": {
            "p": {"id": "p", "rules": [{"id": "r", "action": "deny", "conditions": [{"field": "method", "operator": "equals", "value": "DELETE"}]}]},
            "q": {"id": "q", "mode": "sometimes"}
        }}"#;
        let data: RawData<'_> = serde_json::from_str(text).unwrap();
        let nothing = Validated::default();
        let err = prepare_raw(&data, &mut EntryCache::default(), &nothing).unwrap_err();
        assert!(err.starts_with("agent cd: unknown status"), "{err}");

        // What a VM publishes after validating everything but the two broken entries, and
        // the broken ones "validated" too.
        let hash = |entries: &[crate::config::RawEntry<'_>], key: &str| {
            text_hash(entries.iter().find(|e| e.key == key).unwrap().text)
        };
        let (p, q) = (hash(&data.policies, "p"), hash(&data.policies, "q"));
        let p_facts = PolicyFacts {
            reads: Reads {
                method: true,
                ..Reads::default()
            },
            timezone: "UTC".into(),
            ..PolicyFacts::default()
        };
        let q_facts = PolicyFacts {
            timezone: "UTC".into(),
            ..PolicyFacts::default()
        };
        let validated = Validated::decode(&Validated::encode(
            ["AB", "cd", "ef"].map(|k| hash(&data.agents, k)).to_vec(),
            vec![(p, &p_facts), (q, &q_facts)],
            Vec::new(),
        ));
        let prepared = prepare_raw(&data, &mut EntryCache::default(), &validated).unwrap();
        assert_eq!(prepared.validated_here, (0, 0));
        assert!(prepared.reads.method, "facts from the set");
        let entries = &prepared.entries;
        assert!(
            entries.agents.map["ab"].value.value.get().is_none(),
            "not prepared yet"
        );
        assert!(
            entries.policies.map["p"].value.value.get().is_none(),
            "not prepared yet"
        );

        let eager = prepare_values(
            &serde_json::from_str(
                text.replace("\"sometimes\"", "\"active\"")
                    .replace("\"mode\": \"active\"", "\"mode\": \"enforce\"")
                    .as_str(),
            )
            .unwrap(),
            &mut EntryCache::default(),
        )
        .unwrap();
        assert_eq!(eager.entries.policies.map["p"].facts, p_facts);
        assert_eq!(entries.agent("ab"), eager.entries.agent("ab"));
        assert!(entries.agent("ab").is_some());
        assert_eq!(
            entries.policies.map["p"].value(),
            eager.entries.policies.map["p"].value()
        );
        assert_eq!(entries.problem("ab"), None);

        assert_eq!(entries.agent("cd"), None);
        let problem = entries.problem("cd").unwrap();
        assert!(problem.starts_with("agent cd: unknown status"), "{problem}");
        let problem = entries.problem("ef").unwrap();
        assert!(problem.starts_with("policy q: unknown mode"), "{problem}");
        assert_eq!(entries.problem("gh"), None, "unknown agents are no problem");

        let published = Validated::decode(&entries.validated(Some(7)));
        assert!(published.modules(7));
        assert_eq!(published.len(), (2, 1, 1), "{published:?}");
        assert!(
            published.agent(hash(&data.agents, "AB")) && !published.agent(hash(&data.agents, "cd"))
        );
        assert_eq!(published.policy(p), Some(p_facts));
        assert_eq!(
            Validated::decode(b"\x02\x00\x00\x00short"),
            Validated::default()
        );
    }

    /// A push prepares only the entries it changed and shares the rest with the previous
    /// configuration: the whole section when nothing in it changed, and the same entries
    /// whether the keys kept their order or not. The result is always what preparing the
    /// document from scratch gives.
    #[test]
    fn a_push_shares_every_unchanged_entry() {
        let doc = |agents: &str, policies: &str, tz: &str| {
            format!(
                r#"{{"agents": {{{agents}}}, "policies": {{{policies}}}, "timezones": {{{tz}}}}}"#
            )
        };
        let agents = r#""AA": {"status": "active", "name": "a", "policies": ["p"]},
            "bb": {"status": "active", "name": "b", "policies": ["q"]},
            "cc": {"status": "active", "name": "c"}"#;
        let policies = r#""p": {"id": "p"}, "q": {"id": "q", "timezone": "Europe/Paris"}"#;
        let paris = r#""Europe/Paris": [[0, 60]]"#;
        let cache = &mut EntryCache::default();
        let nothing = Validated::default();
        fn load(cache: &mut EntryCache, text: &str) -> PreparedValues {
            let nothing = Validated::default();
            let data: RawData<'_> = serde_json::from_str(text).unwrap();
            let got = prepare_raw(&data, cache, &nothing).unwrap();
            let fresh = prepare_raw(&data, &mut EntryCache::default(), &nothing).unwrap();
            assert_eq!(got.entries.document(), fresh.entries.document(), "{text}");
            got
        }
        let first = load(cache, &doc(agents, policies, paris));
        assert_eq!(first.validated_here, (3, 2));
        let agent = |p: &PreparedValues, key: &str| p.entries.agents.map[key].clone();

        let same = load(cache, &doc(agents, policies, paris));
        assert_eq!(same.validated_here, (0, 0));
        assert!(Arc::ptr_eq(&same.entries.agents, &first.entries.agents));
        assert!(Arc::ptr_eq(&same.entries.policies, &first.entries.policies));

        // One agent changed, keys in the same order.
        let renamed = agents.replace(r#""name": "b""#, r#""name": "b2""#);
        let one = load(cache, &doc(&renamed, policies, paris));
        assert_eq!(one.validated_here, (1, 0));
        assert!(!Arc::ptr_eq(&one.entries.agents, &first.entries.agents));
        assert!(Arc::ptr_eq(&agent(&one, "aa"), &agent(&first, "aa")));
        assert!(Arc::ptr_eq(&agent(&one, "cc"), &agent(&first, "cc")));
        assert!(!Arc::ptr_eq(&agent(&one, "bb"), &agent(&first, "bb")));
        assert!(Arc::ptr_eq(&one.entries.policies, &first.entries.policies));

        // Another order and a new agent: a new map, the same entries.
        let reordered = format!(
            r#""dd": {{"status": "active", "name": "d"}}, "cc": {{"status": "active", "name": "c"}}, {}"#,
            renamed
                .split(r#""cc""#)
                .next()
                .unwrap()
                .trim_end()
                .trim_end_matches(',')
        );
        let moved = load(cache, &doc(&reordered, policies, paris));
        assert_eq!(moved.validated_here, (1, 0), "only dd");
        assert!(Arc::ptr_eq(&agent(&moved, "cc"), &agent(&first, "cc")));
        assert!(Arc::ptr_eq(&agent(&moved, "bb"), &agent(&one, "bb")));

        // A policy whose timezone lost its table is prepared again (and refused).
        let data = doc(&reordered, policies, r#""Asia/Tokyo": [[0, 540]]"#);
        let data: RawData<'_> = serde_json::from_str(&data).unwrap();
        let err = prepare_raw(&data, cache, &nothing).unwrap_err();
        assert!(err.starts_with("policy q: "), "{err}");
        assert!(
            Arc::ptr_eq(&cache.entries.agents, &moved.entries.agents),
            "a refused document leaves the cache as it was"
        );

        // A key written twice: the later entry counts, also on the next loads and when
        // only the earlier one changes.
        let twice = format!(r#"{agents}, "cc": {{"status": "suspended", "name": "c"}}"#);
        let dup = load(cache, &doc(&twice, policies, paris));
        assert_eq!(
            dup.entries.agent("cc").unwrap()["status"],
            "suspended".into()
        );
        let again = load(cache, &doc(&twice, policies, paris));
        assert_eq!(
            again.entries.agent("cc").unwrap()["status"],
            "suspended".into()
        );
        let earlier = twice.replacen(r#""name": "c""#, r#""name": "c2""#, 1);
        let changed = load(cache, &doc(&earlier, policies, paris));
        assert_eq!(
            changed.entries.agent("cc").unwrap()["status"],
            "suspended".into()
        );
    }

    #[test]
    fn same_bytes_is_byte_equality() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (a, b) in [
            (key, key),
            (
                key,
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeF",
            ),
            (
                key,
                "1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            ("p-1", "p-2"),
            ("0123456789", "0123456789"),
            ("0123456789", "012345678x"),
            ("01234567", "012345678"),
            ("", ""),
        ] {
            assert_eq!(same_bytes(a.as_bytes(), b.as_bytes()), a == b, "{a} {b}");
        }
    }

    #[test]
    fn the_cache_reuses_only_unchanged_entries() {
        let data = policy(json!({"rules": [
            {"id": "r", "action": "deny", "conditions": [{"field": "method", "operator": "equals", "value": "DELETE"}]}
        ]}));
        let want = prepare_values(&data, &mut EntryCache::default())
            .unwrap()
            .entries
            .document();
        let mut cache = EntryCache::default();
        let first = prepare_values(&data, &mut cache).unwrap();
        assert_eq!(first.entries.document(), want);
        assert!(first.reads.method);
        assert_eq!(cache.entries.policies.map.len(), 1);
        // Same document: served from the cache, same result.
        let again = prepare_values(&data, &mut cache).unwrap();
        assert_eq!(again.entries.document(), want);
        assert!(again.reads.method);
        // A changed policy is prepared again; a broken one leaves the cache as it was.
        let mut changed = data.clone();
        changed["policies"]["p"]["priority"] = json!(7);
        let got = prepare_values(&changed, &mut cache).unwrap();
        assert_eq!(
            got.entries.document()["policies"]["p"]["priority"],
            regorus::Value::from(7i64)
        );
        let mut broken = data.clone();
        broken["policies"]["p"]["mode"] = json!("sometimes");
        assert!(prepare_values(&broken, &mut cache).is_err());
        assert_eq!(cache.entries.policies.map.len(), 1);
    }
}
