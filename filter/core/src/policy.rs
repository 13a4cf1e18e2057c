//! Compiling a policy bundle once and evaluating requests against it with regorus.
//!
//! [`CompiledPolicy::evaluate`] memoises decisions per VM, keyed on exactly the request
//! facts the bundle reads (identity, domain, the fields rule conditions test). A memoised
//! decision holds from its evaluation until the next instant a time input may change it
//! ([`Clock`]: the next local minute at which a window opens or closes or a day or hour
//! condition can flip, or the next UTC offset change; the next minute when a `minute`
//! condition or custom Rego is in the bundle). Decisions in use that expire soon are
//! taken again ahead of time, as of their expiry, from the filter's tick
//! ([`CompiledPolicy::warm`]), so a time boundary does not send every key in use through
//! regorus at once. A new configuration builds a new
//! `CompiledPolicy`; it takes over the previous one's decisions
//! ([`CompiledPolicy::inherit_memo`]) only where nothing they depend on changed: same
//! modules, timezones and read fields, and the same entries for the agent and its
//! policies — or, for a push that edited domain lists, the same entries apart from
//! domain sets that do not list the request's domain or its parents either way
//! ([`Entries::domain_signature`]). Rate limits and audit stay outside the memo.

use crate::config::{Bundle, RawBundle, RegoModule};
use crate::data::{self, Clock, Entries, EntryCache, Reads, Validated, same_bytes};
use crate::decision::Decision;
use crate::input::RequestFacts;
use crate::time::{MINUTE_NS, OffsetTable};
use crate::{DECISION_RULE, REGO_LIBRARY};
use regorus::{Engine, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// Memoised decisions kept per VM before the memo is cleared.
pub const MEMO_CAPACITY: usize = 16_384;

/// Why a bundle could not be compiled or a request not evaluated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The message carries regorus's `file:line:col` position of the problem.
    #[error("rego module {module} does not compile: {message}")]
    Compile { module: String, message: String },
    #[error("rego module {module} must declare package {expected}, not {found}")]
    Package {
        module: String,
        expected: String,
        found: String,
    },
    #[error("policy data is invalid: {0}")]
    Data(String),
    #[error("evaluation failed: {0}")]
    Eval(String),
    #[error("decision has an unexpected shape: {0}")]
    Shape(String),
}

/// The request facts a memoised decision depends on (owned copy, kept beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemoKey {
    fingerprint: String,
    domain: String,
    method: Option<String>,
    path: Option<String>,
    user_agent: Option<String>,
    source_ip: Option<String>,
}

/// A memoised decision and the span of Envoy's clock it holds for: from the evaluation
/// until the next instant the bundle's [`Clock`] says a time input may change it.
#[derive(Debug, Clone)]
struct Memo {
    key: MemoKey,
    from_ns: u64,
    until_ns: u64,
    decision: Arc<Decision>,
    /// The agent's [`Entries::signature`] when decided.
    agent: Option<u64>,
    /// The agent's [`Entries::domain_signature`] for the request's domain when decided.
    domain: Option<u64>,
    /// Asked for again within its span: [`CompiledPolicy::warm`] decides it ahead of
    /// its expiry.
    used: bool,
    /// The decision from `until_ns` on, taken ahead of time ([`CompiledPolicy::warm`]),
    /// with the end of its span.
    next: Option<(u64, Arc<Decision>)>,
    /// The request facts the key leaves out, which only custom Rego may read, for
    /// deciding ahead of time: the certificate's subject and the scheme.
    subject: Box<str>,
    scheme: Box<str>,
}

/// How long before a memoised decision expires [`CompiledPolicy::warm`] may decide it
/// again.
pub const WARM_HORIZON_NS: u64 = 30_000_000_000;

/// Memoised decisions by [`memo_hash`], and how many.
#[derive(Debug, Clone, Default)]
struct MemoMap {
    buckets: HashMap<u64, Vec<Memo>, crate::config::FastHash>,
    len: usize,
}

// === impl Memo ===

impl Memo {
    /// Whether the memo decides a request at `now`: within its span, or within the
    /// span of the decision taken ahead of time, which then takes over. Returns the end
    /// of the span when that happened.
    fn holds(&mut self, now: u64) -> (bool, Option<u64>) {
        let mut promoted = None;
        if now >= self.until_ns
            && let Some((until_ns, _)) = self.next
            && now < until_ns
            && let Some((until_ns, decision)) = self.next.take()
        {
            self.from_ns = self.until_ns;
            self.until_ns = until_ns;
            self.decision = decision;
            self.used = false;
            promoted = Some(until_ns);
        }
        ((self.from_ns..self.until_ns).contains(&now), promoted)
    }
}

// === impl MemoKey ===

impl MemoKey {
    fn new(facts: &RequestFacts<'_>, reads: &Reads) -> Self {
        let pick = |read: bool, value: &str| read.then(|| value.to_owned());
        Self {
            fingerprint: facts.fingerprint.to_string(),
            domain: facts.domain.to_string(),
            method: pick(reads.method, &facts.method),
            path: pick(reads.path, &facts.path),
            user_agent: pick(reads.user_agent, &facts.user_agent),
            source_ip: pick(reads.source_ip, &facts.source_ip),
        }
    }

    /// Compares without allocating.
    fn matches(&self, facts: &RequestFacts<'_>, reads: &Reads) -> bool {
        let same = |read: bool, stored: &Option<String>, value: &str| {
            !read
                || stored
                    .as_ref()
                    .is_some_and(|s| same_bytes(s.as_bytes(), value.as_bytes()))
        };
        same_bytes(self.fingerprint.as_bytes(), facts.fingerprint.as_bytes())
            && same_bytes(self.domain.as_bytes(), facts.domain.as_bytes())
            && same(reads.method, &self.method, &facts.method)
            && same(reads.path, &self.path, &facts.path)
            && same(reads.user_agent, &self.user_agent, &facts.user_agent)
            && same(reads.source_ip, &self.source_ip, &facts.source_ip)
    }
}

/// The memo's hash of a request: the fields it holds, each hashed a word at a time
/// ([`crate::config::bytes_hash`], which takes each field's length in) and combined,
/// starting from a random seed drawn once per process (per VM in Envoy). Collisions only
/// cost a comparison; the seed keeps a client from forging many requests (domains, paths)
/// with one hash to make every memo lookup of the worker scan a long bucket.
fn memo_hash(facts: &RequestFacts<'_>, reads: &Reads) -> u64 {
    use crate::config::{bytes_hash, hash_mix};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(0u64)
    });
    let mut hash: u64 = seed;
    let mut eat = |field: &str| hash = hash_mix(hash, bytes_hash(field.as_bytes()));
    eat(&facts.fingerprint);
    eat(&facts.domain);
    for (read, field) in [
        (reads.method, &facts.method),
        (reads.path, &facts.path),
        (reads.user_agent, &facts.user_agent),
        (reads.source_ip, &facts.source_ip),
    ] {
        if read {
            eat(field);
        }
    }
    crate::config::hash_finish(hash)
}

/// The first instant after `unix_ns` at which a decision taken at `unix_ns` may change
/// (`u64::MAX` when decisions do not depend on the clock): the start of the next minute
/// if every minute counts; otherwise the earliest, over the timezones with boundaries,
/// of the next boundary minute in local time and the next change of UTC offset.
fn valid_until(clock: &Clock, tables: &BTreeMap<String, OffsetTable>, unix_ns: u64) -> u64 {
    let next_minute = (unix_ns / MINUTE_NS + 1).saturating_mul(MINUTE_NS);
    if clock.every_minute {
        return next_minute;
    }
    let now_s = i64::try_from(unix_ns / 1_000_000_000).unwrap_or(i64::MAX);
    let mut until_s = i64::MAX;
    for (tz, minutes) in &clock.boundaries {
        let Some(table) = tables.get(tz) else {
            // Validation refuses a policy whose timezone has no table; stay safe anyway.
            return next_minute;
        };
        let offset = i64::from(table.offset_at(now_s));
        let local_minute = (now_s + offset).div_euclid(60);
        let of_day = u16::try_from(local_minute.rem_euclid(1440)).unwrap_or(0);
        // Minutes to the next boundary, in 1..=1440 (the same minute tomorrow at most).
        let ahead = match minutes.range(of_day + 1..).next() {
            Some(&b) => b - of_day,
            None => minutes.first().map_or(1440, |&first| first + 1440 - of_day),
        };
        let boundary = (local_minute + i64::from(ahead)) * 60 - offset;
        let transition = table.next_transition(now_s).unwrap_or(i64::MAX);
        until_s = until_s.min(boundary).min(transition);
    }
    if until_s == i64::MAX {
        return u64::MAX;
    }
    // Both the boundary and the transition lie after `now_s`, so after `unix_ns`.
    u64::try_from(until_s)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .unwrap_or(next_minute)
}

/// A bundle's Rego modules and the engine prepared with them (compiled, checked, and
/// analysed by one evaluation): built when the configuration is loaded, or on first use
/// when another VM of this Envoy validated the same modules ([`Validated`]). Shared by
/// the configurations of one VM with the same modules (through [`EntryCache`]).
#[derive(Debug)]
pub(crate) struct Modules {
    key: u64,
    modules: Vec<RegoModule>,
    engine: OnceLock<Result<Engine, String>>,
}

/// What [`CompiledPolicy::check_delta`] tells of a delta it accepts.
#[derive(Debug)]
pub struct Checked {
    /// The validated set to publish (`Validated`'s shared form).
    pub validated: Vec<u8>,
    /// Agents, policies and module sets validated here.
    pub validated_here: (usize, usize, usize),
}

/// A bundle compiled once per configuration; evaluation never parses or compiles.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// Holds the modules only; its data document stays empty (see [`Entries`]). Taken
    /// from `modules` on the first evaluation.
    engine: Option<Engine>,
    modules: Arc<Modules>,
    entries: Arc<Entries>,
    tables: BTreeMap<String, OffsetTable>,
    reads: Reads,
    memo: MemoMap,
    /// Decisions taken under previous configurations ([`CompiledPolicy::inherit_memo`]):
    /// each moves into `memo` when its request comes again and its agent's signature is
    /// unchanged, or is dropped.
    inherited: MemoMap,
    /// Agents, policies and module sets validated while compiling (not reused, not known
    /// as validated already).
    validated_here: (usize, usize, usize),
    /// No memoised decision in `memo` that [`CompiledPolicy::warm`] may decide ahead
    /// expires before this (it may be earlier than the first that does).
    next_expiry: u64,
}

// === impl MemoMap ===

impl MemoMap {
    /// Takes the memo of the request with these facts out of the map.
    fn take(&mut self, hash: u64, facts: &RequestFacts<'_>, reads: &Reads) -> Option<Memo> {
        let bucket = self.buckets.get_mut(&hash)?;
        let i = bucket.iter().position(|m| m.key.matches(facts, reads))?;
        self.len -= 1;
        Some(bucket.swap_remove(i))
    }

    /// Adds `other`'s memos; on the same request, the newer configuration's memo stays.
    fn merge(mut self, mut other: MemoMap, other_is_newer: bool) -> MemoMap {
        // Move the smaller map into the larger one.
        let mut newer_wins = other_is_newer;
        if other.len > self.len {
            std::mem::swap(&mut self, &mut other);
            newer_wins = !newer_wins;
        }
        for (hash, memos) in other.buckets {
            let bucket = self.buckets.entry(hash).or_default();
            for memo in memos {
                match bucket.iter_mut().find(|m| m.key == memo.key) {
                    Some(same) if newer_wins => *same = memo,
                    Some(_) => {}
                    None => {
                        bucket.push(memo);
                        self.len += 1;
                    }
                }
            }
        }
        self
    }
}

// === impl CompiledPolicy ===

impl CompiledPolicy {
    /// Validates the data, compiles the modules against it and checks the decision rule
    /// by evaluating it once on an empty request.
    pub fn compile(bundle: &Bundle) -> Result<Self, PolicyError> {
        Self::compile_with(bundle, &mut EntryCache::default())
    }

    /// [`CompiledPolicy::compile`], reusing the agents and policies `cache` prepared for
    /// the previous configuration when their JSON is unchanged (a filter VM keeps one
    /// cache across configurations, so a push converts only what changed).
    pub fn compile_with(bundle: &Bundle, cache: &mut EntryCache) -> Result<Self, PolicyError> {
        // Entries are keyed by their content, so those of a bundle that fails later (a
        // module that does not compile) are still right to reuse.
        let prepared = data::prepare_values(&bundle.data, cache).map_err(PolicyError::Data)?;
        Self::build(&bundle.modules, prepared, cache, &Validated::default())
    }

    /// [`CompiledPolicy::compile_with`] for the filter's configuration, whose agents and
    /// policies are still JSON text: unchanged entries are not even parsed, and entries
    /// whose text another VM of this Envoy validated are prepared on first use.
    pub fn compile_raw(
        bundle: &RawBundle<'_>,
        cache: &mut EntryCache,
        validated: &Validated,
    ) -> Result<Self, PolicyError> {
        let prepared =
            data::prepare_raw(&bundle.data, cache, validated).map_err(PolicyError::Data)?;
        Self::build(&bundle.modules, prepared, cache, validated)
    }

    /// [`CompiledPolicy::compile_raw`] for a delta (`crate::delta`) against the
    /// configuration whose entries `cache` holds, which the caller makes sure of: only
    /// the agents and policies the delta lists are looked at ([`data::prepare_raw_delta`]),
    /// and a delta without modules keeps the engine of the base's. `Ok(None)` when the
    /// delta cannot be compiled this way (no engine kept for the base's modules, or a
    /// policy it leaves alone lost its timezone's table): compile the merged
    /// configuration with [`CompiledPolicy::compile_raw`] instead, which gives the same
    /// result from any cache.
    pub fn compile_raw_delta(
        delta: &RawBundle<'_>,
        cache: &mut EntryCache,
        validated: &Validated,
    ) -> Result<Option<Self>, PolicyError> {
        let kept = match delta.modules.is_empty() {
            true => match cache.engine.clone() {
                Some(kept) => Some(kept),
                None => return Ok(None),
            },
            false => None,
        };
        let modules = kept
            .as_ref()
            .map_or(&delta.modules[..], |kept| &kept.modules);
        let Some(prepared) =
            data::prepare_raw_delta(&delta.data, cache, validated).map_err(PolicyError::Data)?
        else {
            return Ok(None);
        };
        Self::build(modules, prepared, cache, validated).map(Some)
    }

    /// Accepts a delta against `base`, the entries a previous canary published, without
    /// preparing the entries the delta leaves alone, where that gives the answer
    /// [`CompiledPolicy::compile_raw`] would give on the merged configuration: for a VM
    /// that decides no requests yet (Envoy's configuration canary, a fresh VM per push),
    /// which would otherwise prepare every agent and policy to check one. The delta's own
    /// entries are validated (or found in `validated`) and its modules are the base's;
    /// the entries it leaves alone were accepted with the base, and each policy among
    /// them only needs its timezone's table still in the bundle: so it is when the delta
    /// keeps every table the base had, and otherwise the policy's facts in `validated`
    /// tell. Returns the validated set to publish for the delta's
    /// configuration. `None` when it cannot be told this way: the delta is not against
    /// `base`, changes the modules, leaves alone a policy whose facts `validated` lacks
    /// or whose timezone lost its table, or has an entry that fails (compile the merged
    /// configuration then: it refuses with the error a whole configuration gets).
    pub fn check_delta(
        base: &crate::delta::Retained,
        delta: &crate::config::RawPluginConfig<'_>,
        validated: &Validated,
    ) -> Option<Checked> {
        let bundle = delta.bundle.as_ref()?;
        let against = delta.base.as_deref()?;
        if !bundle.modules.is_empty()
            || delta.mode != crate::config::Mode::Enforce
            || !base.serves(against, &delta.version)
        {
            return None;
        }
        let own = RawBundle {
            modules: base.modules().to_vec(),
            data: crate::config::RawData {
                agents: bundle.data.agents.clone(),
                policies: bundle.data.policies.clone(),
                timezones: bundle.data.timezones.clone(),
            },
        };
        let checked = Self::compile_raw(&own, &mut EntryCache::default(), validated).ok()?;
        // Every policy of the base had its timezone's table: while the delta keeps every
        // table the base had, each still has. Otherwise each policy it leaves alone is
        // looked at.
        let listed: std::collections::HashSet<&str> =
            bundle.data.policies.iter().map(|e| &*e.key).collect();
        let all_kept = base
            .timezones()
            .iter()
            .all(|tz| checked.tables.contains_key(tz));
        let kept_tables = all_kept
            || base
                .policies()
                .filter(|(key, _)| !listed.contains(key))
                .all(|(_, hash)| {
                    validated
                        .timezone(hash)
                        .is_some_and(|tz| checked.tables.contains_key(&tz))
                });
        if !kept_tables {
            return None;
        }
        // The base's entries and the delta's: a superset of the configuration's, by the
        // entries this delta replaces, so the set never outgrows two configurations.
        let (mut agents, mut policies) = base.hashes();
        agents.extend(bundle.data.agents.iter().map(|e| e.content_hash()));
        policies.extend(bundle.data.policies.iter().map(|e| e.content_hash()));
        let added = Validated::decode(&checked.validated());
        Some(Checked {
            validated: validated.extended(&added, &agents, &policies),
            validated_here: checked.validated_here,
        })
    }

    /// Compiles `modules` and checks the decision rule by evaluating it once on an empty
    /// request, or takes the engine `cache` prepared for the same modules, or defers it
    /// to the first evaluation when another VM validated them.
    fn build(
        modules: &[RegoModule],
        prepared: data::PreparedValues,
        cache: &mut EntryCache,
        validated: &Validated,
    ) -> Result<Self, PolicyError> {
        let custom_modules: Vec<&str> =
            modules.iter().filter_map(|m| custom_key(&m.name)).collect();
        if let Some(missing) = prepared
            .custom_keys
            .iter()
            .find(|k| !custom_modules.contains(&k.as_str()))
        {
            return Err(PolicyError::Data(format!(
                "a policy refers to custom module {missing:?} but the bundle has no module custom/{missing}.rego"
            )));
        }
        let key = modules_hash(modules);
        // The agents and policies reach Rego in the input, so an engine prepared for the
        // same modules (regorus analyses them on the first evaluation) serves a new
        // configuration as is: a push that changes only data costs no Rego work.
        let (agents, policies) = prepared.validated_here;
        let mut built = 0;
        let cached = cache.engine.as_ref().filter(|same| same.key == key);
        // Modules that failed on first use are compiled here again: the error refuses
        // the configuration instead of failing every request.
        let failed = cached.is_some_and(|same| matches!(same.engine.get(), Some(Err(_))));
        let modules = match cached {
            Some(same) if !failed => same.clone(),
            _ => {
                let engine = OnceLock::new();
                if failed || !validated.modules(key) {
                    built = 1;
                    let ready = prepared_engine(modules)?;
                    let _ = engine.set(Ok(ready));
                }
                Arc::new(Modules {
                    key,
                    modules: modules.to_vec(),
                    engine,
                })
            }
        };
        cache.engine = Some(modules.clone());
        Ok(Self {
            engine: None,
            modules,
            entries: prepared.entries,
            tables: prepared.tables,
            reads: prepared.reads,
            memo: MemoMap::default(),
            inherited: MemoMap::default(),
            validated_here: (agents, policies, built),
            next_expiry: u64::MAX,
        })
    }

    /// The bundle modules for the built-in library: what the control plane ships.
    pub fn library_modules() -> Vec<RegoModule> {
        REGO_LIBRARY
            .iter()
            .map(|(name, source)| RegoModule {
                name: (*name).to_owned(),
                source: (*source).to_owned(),
            })
            .collect()
    }

    /// Evaluates one request, from the memo when the same facts were decided since the
    /// clock last crossed a boundary of the bundle.
    pub fn evaluate(&mut self, facts: &RequestFacts<'_>) -> Result<Decision, PolicyError> {
        self.evaluate_memo(facts)
            .map(|(decision, _)| (*decision).clone())
    }

    /// Like [`CompiledPolicy::evaluate`], sharing the memoised decision instead of copying
    /// it, and telling whether the memo answered. A hit allocates nothing.
    pub fn evaluate_memo(
        &mut self,
        facts: &RequestFacts<'_>,
    ) -> Result<(Arc<Decision>, bool), PolicyError> {
        let hash = memo_hash(facts, &self.reads);
        let now = facts.unix_ns;
        // One scan of the bucket: a hit answers; a miss remembers where an expired entry of
        // the same request sits, to replace it after evaluating.
        let reads = &self.reads;
        let bucket = self.memo.buckets.get_mut(&hash);
        let memo = bucket.and_then(|b| b.iter_mut().find(|m| m.key.matches(facts, reads)));
        let slot = memo.is_some();
        if let Some(memo) = memo {
            let (holds, promoted) = memo.holds(now);
            if let Some(until_ns) = promoted {
                self.next_expiry = self.next_expiry.min(until_ns);
            }
            if holds {
                memo.used = true;
                return Ok((memo.decision.clone(), true));
            }
        }
        let agent = self.entries.signature(&facts.fingerprint);
        // A previous configuration's decision, while it holds and nothing it depends on
        // changed.
        let inherited = match self.inherited.len {
            0 => None,
            _ => self
                .inherited
                .take(hash, facts, &self.reads)
                .and_then(|mut m| m.holds(now).0.then_some(m))
                .and_then(|mut m| {
                    if m.agent != agent {
                        // The push changed the agent's entries; the decision stands if
                        // it changed nothing this request's domain meets.
                        let domain = self
                            .entries
                            .domain_signature(&facts.fingerprint, &facts.domain);
                        if domain.is_none() || m.domain != domain {
                            return None;
                        }
                        m.agent = agent;
                    }
                    Some(m)
                }),
        };
        let (memo, hit) = match inherited {
            Some(mut memo) => {
                memo.used = true;
                (memo, true)
            }
            None => {
                let decision = Arc::new(self.evaluate_fresh(facts)?);
                let memo = Memo {
                    key: MemoKey::new(facts, &self.reads),
                    from_ns: now,
                    until_ns: valid_until(&self.reads.clock, &self.tables, now),
                    decision,
                    agent,
                    domain: self
                        .entries
                        .domain_signature(&facts.fingerprint, &facts.domain),
                    used: false,
                    next: None,
                    subject: facts.subject.as_ref().into(),
                    scheme: facts.scheme.as_ref().into(),
                };
                (memo, false)
            }
        };
        let decision = memo.decision.clone();
        self.next_expiry = self.next_expiry.min(memo.until_ns);
        let reads = &self.reads;
        if slot
            && let Some(stale) = self
                .memo
                .buckets
                .get_mut(&hash)
                .and_then(|b| b.iter_mut().find(|m| m.key.matches(facts, reads)))
        {
            *stale = memo;
            return Ok((decision, hit));
        }
        if self.memo.len >= MEMO_CAPACITY {
            self.memo = MemoMap::default();
        }
        self.memo.buckets.entry(hash).or_default().push(memo);
        self.memo.len += 1;
        Ok((decision, hit))
    }

    /// Takes over `previous`'s memoised decisions (its own and those it inherited) when
    /// this configuration has the same modules, timezones and read fields. Each is used
    /// only while it holds and if its agent's entry and that agent's policies' entries are
    /// unchanged, or changed only in domain sets that list its domain (or the domain's
    /// parents) as before (checked when its request comes again), so a push re-decides
    /// only the requests of the agents it changed, and of a domain-list edit only the
    /// requests for the domains it added or removed: without this, every agent × domain
    /// in use would run regorus again after each push (0.5–1 ms each in V8). At most
    /// [`MEMO_CAPACITY`] are kept; the older ones go first. With the same modules it also
    /// takes over `previous`'s engine, which this configuration would otherwise clone on
    /// its first evaluation (the engine holds only the modules: requests bring their
    /// entries in the input).
    pub fn inherit_memo(&mut self, previous: &mut CompiledPolicy) {
        if self.modules.key == previous.modules.key && self.engine.is_none() {
            self.engine = previous.engine.take();
        }
        if self.modules.key != previous.modules.key
            || self.reads != previous.reads
            || self.tables != previous.tables
        {
            return;
        }
        let newer = std::mem::take(&mut previous.memo);
        let mut older = std::mem::take(&mut previous.inherited);
        if newer.len + older.len > MEMO_CAPACITY {
            older = MemoMap::default();
        }
        self.inherited = older.merge(newer, true);
    }

    /// Decides again, ahead of time, the memoised decisions asked for again within their
    /// span that expire within [`WARM_HORIZON_NS`] of `now`. Each is evaluated as of its
    /// expiry and takes over then, so the requests after a time boundary (a window
    /// opening, a new day, every minute with a `minute` condition) find their decisions
    /// memoised instead of all running regorus at once, on the worker, between requests.
    /// Paced to spread the work over the calls left, `period_ns` apart, before the first
    /// of them expires; at most `max` per call. A decision that fails to evaluate is left
    /// to its next request (which counts the error). Returns how many were decided.
    pub fn warm(&mut self, now: u64, period_ns: u64, max: usize) -> usize {
        if self.next_expiry.saturating_sub(now) > WARM_HORIZON_NS {
            return 0;
        }
        // Due: (expiry, hash, index in its bucket), soonest first.
        let mut due = Vec::new();
        let mut later = u64::MAX;
        for (hash, bucket) in &self.memo.buckets {
            for (i, m) in bucket.iter().enumerate() {
                if m.next.is_some() || m.until_ns <= now || m.until_ns == u64::MAX {
                    continue;
                }
                if m.used && m.until_ns - now <= WARM_HORIZON_NS {
                    due.push((m.until_ns, *hash, i));
                } else {
                    later = later.min(m.until_ns);
                }
            }
        }
        due.sort_unstable();
        let Some(&(first, _, _)) = due.first() else {
            self.next_expiry = later;
            return 0;
        };
        let calls_left = usize::try_from((first - now) / period_ns.max(1))
            .unwrap_or(usize::MAX)
            .max(1);
        let budget = due.len().div_ceil(calls_left).min(max);
        let (now_due, left) = due.split_at(budget);
        for &(until_ns, _, _) in left {
            later = later.min(until_ns);
        }
        let mut decided = 0;
        for &(until_ns, hash, i) in now_due {
            let Some(m) = self.memo.buckets.get(&hash).and_then(|b| b.get(i)) else {
                continue;
            };
            let field = |f: &Option<String>| Cow::Owned(f.clone().unwrap_or_default());
            let facts = RequestFacts {
                fingerprint: Cow::Owned(m.key.fingerprint.clone()),
                subject: Cow::Owned(m.subject.to_string()),
                domain: Cow::Owned(m.key.domain.clone()),
                method: field(&m.key.method),
                path: field(&m.key.path),
                user_agent: field(&m.key.user_agent),
                source_ip: field(&m.key.source_ip),
                scheme: Cow::Owned(m.scheme.to_string()),
                unix_ns: until_ns,
            };
            let next = self.evaluate_fresh(&facts).ok().map(|decision| {
                let next_until = valid_until(&self.reads.clock, &self.tables, until_ns);
                (next_until, Arc::new(decision))
            });
            if let Some(m) = self.memo.buckets.get_mut(&hash).and_then(|b| b.get_mut(i)) {
                decided += usize::from(next.is_some());
                // A failure is not tried again before the decision's next request.
                m.used = next.is_some();
                m.next = next;
            }
        }
        self.next_expiry = later;
        decided
    }

    /// Evaluates one request with regorus, bypassing the memo.
    pub fn evaluate_fresh(&mut self, facts: &RequestFacts<'_>) -> Result<Decision, PolicyError> {
        if let Some(problem) = self.entries.problem(&facts.fingerprint) {
            return Err(PolicyError::Data(problem));
        }
        let engine = match &mut self.engine {
            Some(engine) => engine,
            None => {
                let shared = self.modules.engine().map_err(PolicyError::Eval)?;
                self.engine.insert(shared.clone())
            }
        };
        evaluate(engine, facts.to_value(&self.tables, &self.entries))
    }

    /// How many agents, policies and module sets (0 or 1) compiling this configuration
    /// validated itself: neither unchanged since the previous configuration nor in the
    /// [`Validated`] it was given.
    pub fn validated_here(&self) -> (usize, usize, usize) {
        self.validated_here
    }

    /// This configuration's validated entries and modules, in their shared form
    /// ([`Validated::decode`]).
    pub fn validated(&self) -> Vec<u8> {
        let usable = self.modules.engine.get().is_none_or(Result::is_ok);
        self.entries.validated(usable.then_some(self.modules.key))
    }

    /// The agent's [`Entries::signature`] in this configuration.
    #[cfg(test)]
    pub(crate) fn signature(&self, fingerprint: &str) -> Option<u64> {
        self.entries.signature(fingerprint)
    }

    /// Memoised decisions currently held (not counting inherited ones not yet used).
    pub fn memo_len(&self) -> usize {
        self.memo.len
    }

    /// The earliest last transition over the bundle's offset tables: after it, local
    /// times are extrapolated with the last known offset (the control plane refreshes
    /// bundles long before).
    pub fn tables_valid_until(&self) -> i64 {
        self.tables
            .iter()
            .filter(|(tz, _)| tz.as_str() != "UTC")
            .map(|(_, t)| t.last_start())
            .min()
            .unwrap_or(i64::MAX)
    }
}

/// A new engine with `modules`, each checked to declare its package: the library's
/// `chronoguard`, a custom module `chronoguard.custom.<key>`.
fn engine_for(modules: &[RegoModule]) -> Result<Engine, PolicyError> {
    let mut engine = Engine::new();
    engine.set_rego_v0(false);
    for module in modules {
        let package = engine
            .add_policy(module.name.clone(), module.source.clone())
            .map_err(|e| PolicyError::Compile {
                module: module.name.clone(),
                message: e.to_string(),
            })?;
        let expected = match custom_key(&module.name) {
            Some(key) => format!("data.chronoguard.custom.{key}"),
            None => "data.chronoguard".to_owned(),
        };
        if package != expected {
            return Err(PolicyError::Package {
                module: module.name.clone(),
                expected: expected.trim_start_matches("data.").to_owned(),
                found: package.trim_start_matches("data.").to_owned(),
            });
        }
    }
    Ok(engine)
}

// === impl Modules ===

impl Modules {
    /// The prepared engine, built now if it was deferred.
    fn engine(&self) -> Result<&Engine, String> {
        self.engine
            .get_or_init(|| prepared_engine(&self.modules).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| format!("rego modules: {e}"))
    }
}

/// An engine with `modules`, its decision rule checked by one evaluation on an empty
/// request (which also has regorus analyse the modules, once for every configuration
/// that shares them).
fn prepared_engine(modules: &[RegoModule]) -> Result<Engine, PolicyError> {
    let mut engine = engine_for(modules)?;
    let input = RequestFacts::default().to_value(&BTreeMap::new(), &Entries::default());
    evaluate(&mut engine, input)?;
    Ok(engine)
}

/// The decision for `input`.
fn evaluate(engine: &mut Engine, input: Value) -> Result<Decision, PolicyError> {
    engine.set_input(input);
    let value = engine
        .eval_rule(DECISION_RULE.to_owned())
        .map_err(|e| PolicyError::Eval(e.to_string()))?;
    decision_from_value(&value)
}

/// The [`EntryCache`] key of a bundle's modules.
fn modules_hash(modules: &[RegoModule]) -> u64 {
    // Each name's and source's hash, then the hash of those (`bytes_hash` takes lengths in).
    let words: Vec<u8> = modules
        .iter()
        .flat_map(|m| [m.name.as_bytes(), m.source.as_bytes()])
        .flat_map(|part| crate::config::bytes_hash(part).to_le_bytes())
        .collect();
    crate::config::bytes_hash(&words)
}

/// `custom/<key>.rego` → `<key>`.
fn custom_key(module_name: &str) -> Option<&str> {
    module_name
        .strip_prefix("custom/")
        .and_then(|rest| rest.strip_suffix(".rego"))
}

fn decision_from_value(value: &Value) -> Result<Decision, PolicyError> {
    if *value == Value::Undefined {
        return Err(PolicyError::Shape("decision is undefined".into()));
    }
    let json = serde_json::to_value(value).map_err(|e| PolicyError::Shape(e.to_string()))?;
    serde_json::from_value(json).map_err(|e| PolicyError::Shape(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(data: serde_json::Value) -> Bundle {
        Bundle {
            modules: CompiledPolicy::library_modules(),
            data,
        }
    }

    /// New York around the 2026 changes: spring forward 2026-03-08 07:00 UTC (02:00 EST
    /// → 03:00 EDT), fall back 2026-11-01 06:00 UTC (02:00 EDT → 01:00 EST).
    fn new_york() -> BTreeMap<String, OffsetTable> {
        let table = crate::time::offset_table("America/New_York", 1_767_225_600, 1_798_761_600)
            .and_then(OffsetTable::new)
            .unwrap();
        BTreeMap::from([("America/New_York".to_owned(), table)])
    }

    fn clock(minutes: &[u16]) -> Clock {
        Clock {
            every_minute: false,
            boundaries: BTreeMap::from([(
                "America/New_York".to_owned(),
                minutes.iter().copied().collect(),
            )]),
        }
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn memo_validity_ends_at_the_next_boundary_or_offset_change() {
        let tables = new_york();
        // 2026-03-09 13:10 EDT (17:10 UTC), window 09:00-17:00: valid until 17:00 EDT.
        let at = 1_773_076_200 * SECOND;
        assert_eq!(
            valid_until(&clock(&[0, 540, 1020]), &tables, at + 7 * SECOND),
            (1_773_076_200 + 230 * 60) * SECOND
        );
        // After the last boundary of the day: valid until local midnight.
        assert_eq!(
            valid_until(&clock(&[0, 540, 600]), &tables, at),
            (1_773_076_200 + 650 * 60) * SECOND
        );
        // 01:50 EST on the spring-forward day with an edge at 03:15: the offset change at
        // 07:00 UTC comes first (local time jumps from 02:00 to 03:00).
        let before_jump = 1_772_952_600 * SECOND;
        assert_eq!(
            valid_until(&clock(&[0, 195]), &tables, before_jump),
            1_772_953_200 * SECOND
        );
        // 01:30 EDT on the fall-back day with an edge at 01:45: reached first in EDT.
        let before_fall = 1_793_511_000 * SECOND;
        assert_eq!(
            valid_until(&clock(&[0, 105]), &tables, before_fall),
            (1_793_511_000 + 15 * 60) * SECOND
        );
        // Every minute counts; no clock dependence at all.
        let every = Clock {
            every_minute: true,
            ..Clock::default()
        };
        assert_eq!(
            valid_until(&every, &tables, at + 7 * SECOND),
            at + 60 * SECOND
        );
        assert_eq!(valid_until(&Clock::default(), &tables, at), u64::MAX);
    }

    /// Brute force over a year of New York time: within a validity span the local day and
    /// the segment between boundaries the local minute falls in never change.
    #[test]
    fn memo_validity_never_spans_a_boundary() {
        let tables = new_york();
        let table = &tables["America/New_York"];
        let minutes = [0u16, 30, 120, 150, 195, 540, 1020, 1439];
        let clock = clock(&minutes);
        let signature = |ns: u64| {
            let local = table.local(i64::try_from(ns / SECOND).unwrap());
            let segment = minutes
                .iter()
                .filter(|&&m| u32::from(m) <= local.minute)
                .count();
            (local.day, segment)
        };
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (1_767_225_600 + seed % 31_000_000) * SECOND + seed % SECOND;
            let until = valid_until(&clock, &tables, at);
            assert!(until > at);
            let mut t = at;
            while t < until {
                assert_eq!(
                    signature(t),
                    signature(at),
                    "from {at} until {until}, at {t}"
                );
                t += 60 * SECOND;
            }
            assert_eq!(
                signature(until - 1),
                signature(at),
                "from {at} until {until}"
            );
        }
    }

    /// A decision is re-evaluated only where the bundle's clock says it may change: a
    /// request repeated every 10 s through a Tuesday in New York, against a 09:00-17:00
    /// weekday window, misses at the first request, at 09:00 and at 17:00 only.
    /// Agent `ab` on one policy allowing `domains` on weekdays 09:00-17:00 in New York.
    fn office_hours(domains: &[&str]) -> CompiledPolicy {
        let table =
            crate::time::offset_table("America/New_York", 1_767_225_600, 1_798_761_600).unwrap();
        let allowed: serde_json::Map<String, serde_json::Value> = domains
            .iter()
            .map(|d| ((*d).to_owned(), true.into()))
            .collect();
        let data = serde_json::json!({
            "timezones": {"America/New_York": table},
            "agents": {"ab": {"id": "a", "status": "active", "policies": ["p"]}},
            "policies": {"p": {"id": "p", "timezone": "America/New_York",
                "allowed_exact": allowed,
                "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": 540, "end": 1020}]}}
        });
        CompiledPolicy::compile(&bundle(data)).unwrap()
    }

    #[test]
    fn memoised_decisions_last_until_a_boundary() {
        let mut policy = office_hours(&["example.com"]);
        // Tuesday 2026-03-10 00:00:05 EDT = 04:00:05 UTC, for 24 h.
        let start = 1_773_115_205 * SECOND;
        let mut misses = Vec::new();
        let mut allowed = 0;
        for step in 0..(24 * 360) {
            let facts = RequestFacts {
                fingerprint: "ab".into(),
                domain: "example.com".into(),
                unix_ns: start + step * 10 * SECOND,
                ..RequestFacts::default()
            };
            let (decision, hit) = policy.evaluate_memo(&facts).unwrap();
            assert_eq!(*decision, policy.evaluate_fresh(&facts).unwrap());
            allowed += u32::from(decision.allow);
            if !hit {
                misses.push(step * 10 / 60);
            }
        }
        // Minutes after 00:00:05 local: the first request, 09:00 and 17:00.
        assert_eq!(misses, [0, 540, 1020]);
        assert_eq!(allowed, 8 * 360);
    }

    /// The same day with [`CompiledPolicy::warm`] called before every request (a tick
    /// every 10 s): the decisions at 09:00, 17:00 and midnight are taken ahead of time and the
    /// requests after the boundaries find them memoised; a request asked once only is
    /// not decided ahead.
    #[test]
    fn warmed_decisions_take_over_at_a_boundary() {
        let mut policy = office_hours(&["example.com", "once.example"]);
        let start = 1_773_115_205 * SECOND;
        let request = |domain: &'static str, at: u64| RequestFacts {
            fingerprint: "ab".into(),
            domain: domain.into(),
            unix_ns: at,
            ..RequestFacts::default()
        };
        // Asked once, at the start: never decided ahead, decided again after 09:00.
        assert!(
            !policy
                .evaluate_memo(&request("once.example", start))
                .unwrap()
                .1
        );
        let (mut misses, mut warmed, mut allowed) = (Vec::new(), 0, 0);
        for step in 0..(24 * 360) {
            let at = start + step * 10 * SECOND;
            warmed += policy.warm(at, 10 * SECOND, 16);
            let facts = request("example.com", at);
            let (decision, hit) = policy.evaluate_memo(&facts).unwrap();
            assert_eq!(*decision, policy.evaluate_fresh(&facts).unwrap(), "{step}");
            allowed += u32::from(decision.allow);
            if !hit {
                misses.push(step * 10 / 60);
            }
        }
        assert_eq!(misses, [0]);
        // 09:00, 17:00, and the next midnight (the last request is at 23:59:55).
        assert_eq!(warmed, 3);
        assert_eq!(allowed, 8 * 360);
        let late = request("once.example", start + 10 * 3_600 * SECOND);
        let (decision, hit) = policy.evaluate_memo(&late).unwrap();
        assert!(!hit && decision.allow);
        // Nothing due: a call costs no scan.
        assert_eq!(policy.warm(start + 10 * 3_600 * SECOND, 10 * SECOND, 16), 0);
    }

    /// Warming is paced: decisions due together are spread over the calls left before
    /// they expire, at most `max` per call.
    #[test]
    fn warming_is_paced_over_the_calls_left() {
        let data = serde_json::json!({
            "agents": {"ab": {"id": "a", "status": "active", "policies": ["p"]}},
            "policies": {"p": {"id": "p", "allowed_suffix": {"example": true},
                "rules": [{"id": "r", "action": "allow", "conditions": [{"field": "minute", "operator": "in", "value": [0, 1, 2]}]}]}}
        });
        let mut policy = CompiledPolicy::compile(&bundle(data)).unwrap();
        // 12:00:05 UTC; every minute is a boundary.
        let start = 1_773_144_005 * SECOND;
        for d in 0..40u64 {
            let facts = RequestFacts {
                fingerprint: "ab".into(),
                domain: format!("d{d}.example").into(),
                unix_ns: start,
                ..RequestFacts::default()
            };
            policy.evaluate_memo(&facts).unwrap();
            policy.evaluate_memo(&facts).unwrap();
        }
        // Not due before 30 s ahead of 12:01.
        assert_eq!(policy.warm(start + 20 * SECOND, SECOND, 16), 0);
        // 30 s before: 40 due over 30 calls (2 per call), then fewer left over fewer calls.
        let mut per_call = Vec::new();
        for s in 30..60 {
            per_call.push(policy.warm(start + (s - 5) * SECOND, SECOND, 16));
        }
        assert_eq!(per_call.iter().sum::<usize>(), 40, "{per_call:?}");
        assert!(per_call.iter().all(|&n| n <= 2), "{per_call:?}");
        assert_eq!(policy.warm(start + 56 * SECOND, SECOND, 1), 0);
    }

    #[test]
    fn library_compiles_on_empty_data() {
        let mut policy = CompiledPolicy::compile(&bundle(serde_json::json!({}))).unwrap();
        let decision = policy.evaluate(&RequestFacts::default()).unwrap();
        assert_eq!(decision, Decision::fixed(false, "no_certificate"));
    }

    #[test]
    fn syntax_error_names_module_and_position() {
        let mut b = bundle(serde_json::json!({}));
        b.modules.push(RegoModule {
            name: "custom/x.rego".into(),
            source: "package chronoguard.custom.x\nallow if {\n".into(),
        });
        let err = CompiledPolicy::compile(&b).unwrap_err().to_string();
        assert!(err.contains("custom/x.rego"), "{err}");
        assert!(err.contains(":3:") || err.contains(":2:"), "{err}");
    }

    #[test]
    fn custom_module_cannot_take_over_the_library_package() {
        let mut b = bundle(serde_json::json!({}));
        b.modules.push(RegoModule {
            name: "custom/evil.rego".into(),
            source: "package chronoguard\nimport rego.v1\nx := 1\n".into(),
        });
        let err = CompiledPolicy::compile(&b).unwrap_err();
        assert!(matches!(err, PolicyError::Package { .. }), "{err}");
    }

    #[test]
    fn missing_custom_module_is_a_configuration_error() {
        let b = bundle(serde_json::json!({"policies": {"p": {"id": "p", "custom": "gone"}}}));
        let err = CompiledPolicy::compile(&b).unwrap_err().to_string();
        assert!(err.contains("custom module \"gone\""), "{err}");
    }

    /// An agent prepared on first use that does not prepare (the validated set named a
    /// text that does not validate) makes its requests evaluation errors, not decisions
    /// about an unknown agent; other agents are decided as usual.
    #[test]
    fn an_agent_that_fails_on_first_use_is_an_evaluation_error() {
        let mut b = two_agents("y.example");
        b.data["agents"]["bb"]["status"] = serde_json::json!("sometimes");
        let text = config_text(b);
        let raw = crate::config::RawPluginConfig::from_slice(&text).unwrap();
        let bundle = raw.bundle.as_ref().unwrap();
        let mut cache = EntryCache::default();
        let refused = CompiledPolicy::compile_raw(bundle, &mut cache, &Validated::default());
        assert!(refused.is_err());
        // Every agent's text "validated", the bad one too.
        let agents = &bundle.data.agents;
        let hashes = agents.iter().map(|e| data::text_hash(e.text)).collect();
        let all = Validated::encode(hashes, Vec::new(), Vec::new());
        let mut policy =
            CompiledPolicy::compile_raw(bundle, &mut cache, &Validated::decode(&all)).unwrap();
        assert_eq!(
            policy.validated_here(),
            (0, 2, 1),
            "the policies and the modules were not in the set"
        );
        let err = policy.evaluate(&request("bb", 0)).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Data(m) if m.contains("agent bb: unknown status")),
            "{err}"
        );
        assert!(policy.evaluate(&request("aa", 0)).unwrap().allow);
        assert_eq!(
            policy.evaluate(&request("zz", 0)).unwrap().reason,
            "unknown_agent"
        );
    }

    /// Modules that fail to compile on first use (the validated set named them) make
    /// every evaluation an error, never a decision.
    #[test]
    fn modules_that_fail_on_first_use_are_an_evaluation_error() {
        let mut b = two_agents("y.example");
        b.modules.push(RegoModule {
            name: "custom/broken.rego".into(),
            source: "package chronoguard.custom.broken\nx := ".into(),
        });
        let key = modules_hash(&b.modules);
        let text = config_text(b);
        let raw = crate::config::RawPluginConfig::from_slice(&text).unwrap();
        let bundle = raw.bundle.as_ref().unwrap();
        let refused =
            CompiledPolicy::compile_raw(bundle, &mut EntryCache::default(), &Validated::default());
        assert!(
            matches!(refused, Err(PolicyError::Compile { .. })),
            "{refused:?}"
        );
        let shared = Validated::encode(Vec::new(), Vec::new(), vec![key]);
        let mut policy = CompiledPolicy::compile_raw(
            bundle,
            &mut EntryCache::default(),
            &Validated::decode(&shared),
        )
        .unwrap();
        assert_eq!(policy.validated_here(), (2, 2, 0));
        let err = policy.evaluate(&request("aa", 0)).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Eval(m) if m.starts_with("rego modules: rego module custom/broken.rego does not compile")),
            "{err}"
        );
        assert!(
            Validated::decode(&policy.validated()).len().2 == 0,
            "not published"
        );
        // The next configuration with these modules compiles them (and is refused).
        let mut cache = EntryCache::default();
        let mut policy =
            CompiledPolicy::compile_raw(bundle, &mut cache, &Validated::decode(&shared)).unwrap();
        assert!(policy.evaluate(&request("aa", 0)).is_err());
        let again = CompiledPolicy::compile_raw(bundle, &mut cache, &Validated::decode(&shared));
        assert!(
            matches!(again, Err(PolicyError::Compile { .. })),
            "{again:?}"
        );
    }

    /// A filter configuration of `bundle`, as JSON text.
    fn config_text(bundle: Bundle) -> Vec<u8> {
        serde_json::to_vec(&crate::config::PluginConfig {
            base: None,
            version: "1".into(),
            mode: crate::config::Mode::Enforce,
            bundle: Some(bundle),
            audit: None,
        })
        .unwrap()
    }

    /// Two agents on their own policies, each allowing one domain.
    fn two_agents(b_domain: &str) -> Bundle {
        let agent = |id: &str, policy: &str| serde_json::json!({"id": id, "tenant_id": "t", "name": id, "status": "active", "policies": [policy]});
        let policy = |id: &str, domain: &str| serde_json::json!({"id": id, "priority": 1, "status": "active", "allowed_exact": {domain: true}});
        bundle(serde_json::json!({
            "agents": {"aa": agent("a", "pa"), "bb": agent("b", "pb")},
            "policies": {"pa": policy("pa", "x.example"), "pb": policy("pb", b_domain)}
        }))
    }

    fn request(fingerprint: &str, at: u64) -> RequestFacts<'static> {
        RequestFacts {
            fingerprint: fingerprint.to_owned().into(),
            domain: "x.example".into(),
            unix_ns: at,
            ..RequestFacts::default()
        }
    }

    #[test]
    fn a_push_keeps_the_memo_of_agents_it_did_not_change() {
        let at = 1_773_076_200 * SECOND;
        let mut cache = EntryCache::default();
        let mut first = CompiledPolicy::compile_with(&two_agents("x.example"), &mut cache).unwrap();
        for fp in ["aa", "bb", "cc"] {
            assert!(!first.evaluate_memo(&request(fp, at)).unwrap().1);
        }
        // Agent b's policy changes: its decision is taken again, a's comes from the memo,
        // and so does the unknown agent's.
        let mut second =
            CompiledPolicy::compile_with(&two_agents("y.example"), &mut cache).unwrap();
        second.inherit_memo(&mut first);
        assert!(
            first.engine.is_none() && second.engine.is_some(),
            "the engine moves too"
        );
        let (a, hit_a) = second.evaluate_memo(&request("aa", at + SECOND)).unwrap();
        let (b, hit_b) = second.evaluate_memo(&request("bb", at + SECOND)).unwrap();
        let (_, hit_c) = second.evaluate_memo(&request("cc", at + SECOND)).unwrap();
        assert!(hit_a && a.allow);
        assert!(!hit_b && !b.allow, "{b:?}");
        assert!(hit_c);
        // Two pushes in a row, the memo unused in between: still inherited; a request
        // before a memo's evaluation is decided again.
        let mut third = CompiledPolicy::compile_with(&two_agents("y.example"), &mut cache).unwrap();
        third.inherit_memo(&mut second);
        let mut fourth =
            CompiledPolicy::compile_with(&two_agents("y.example"), &mut cache).unwrap();
        fourth.inherit_memo(&mut third);
        assert!(fourth.evaluate_memo(&request("bb", at + SECOND)).unwrap().1);
        assert!(!fourth.evaluate_memo(&request("aa", at - SECOND)).unwrap().1);
        // Other modules: nothing is inherited.
        let mut other = two_agents("y.example");
        other.modules.push(RegoModule {
            name: "custom/x.rego".into(),
            source: "package chronoguard.custom.x\nimport rego.v1\ndeny contains \"z\" if false\n"
                .into(),
        });
        let mut fifth = CompiledPolicy::compile_with(&other, &mut cache).unwrap();
        fifth.inherit_memo(&mut fourth);
        assert!(!fifth.evaluate_memo(&request("bb", at + SECOND)).unwrap().1);
    }

    #[test]
    fn a_domain_list_edit_keeps_the_memo_of_the_domains_it_does_not_meet() {
        let at = 1_773_076_200 * SECOND;
        // Agent a on policy pa (its domain sets from `sets`) and pc (allows c.example).
        let bundle = |sets: serde_json::Value, priority: i64, custom: bool| {
            let mut pa = serde_json::json!({"id": "pa", "priority": priority, "status": "active"});
            for (k, v) in sets.as_object().unwrap() {
                pa[k] = v.clone();
            }
            let mut pc = serde_json::json!({"id": "pc", "priority": 0, "status": "active", "allowed_exact": {"c.example": true}});
            let mut modules = CompiledPolicy::library_modules();
            if custom {
                pc["custom"] = "x".into();
                modules.push(RegoModule {
                    name: "custom/x.rego".into(),
                    source: "package chronoguard.custom.x\nimport rego.v1\ndeny contains \"z\" if false\n".into(),
                });
            }
            Bundle {
                modules,
                data: serde_json::json!({
                    "agents": {"aa": {"id": "a", "tenant_id": "t", "name": "a", "status": "active", "policies": ["pa", "pc"]}},
                    "policies": {"pa": pa, "pc": pc}
                }),
            }
        };
        let domains = [
            "x.example",
            "a.y.example",
            "z.example",
            "c.example",
            "b.a.y.example",
        ];
        let ask = |policy: &mut CompiledPolicy, t: u64| -> Vec<(bool, bool)> {
            domains
                .iter()
                .map(|d| {
                    let facts = RequestFacts {
                        domain: (*d).into(),
                        ..request("aa", t)
                    };
                    let (decision, hit) = policy.evaluate_memo(&facts).unwrap();
                    assert_eq!(*decision, policy.evaluate_fresh(&facts).unwrap(), "{d}");
                    (hit, decision.allow)
                })
                .collect()
        };
        let sets = serde_json::json!({"allowed_exact": {"x.example": true}, "allowed_suffix": {"y.example": true}});
        for custom in [false, true] {
            let mut cache = EntryCache::default();
            let mut policy =
                CompiledPolicy::compile_with(&bundle(sets.clone(), 1, custom), &mut cache).unwrap();
            let allowed = [true, true, false, true, true];
            let fresh = ask(&mut policy, at);
            assert_eq!(fresh.iter().map(|d| d.1).collect::<Vec<_>>(), allowed);
            assert!(fresh.iter().all(|d| !d.0));
            let mut t = at;
            // Each push with which of the domains' decisions still stand after it (the
            // others are taken again), and what they decide.
            for (edit, priority, kept, allowed) in [
                // A domain nobody asks for: every decision stands.
                (
                    serde_json::json!({"allowed_exact": {"x.example": true, "new.example": true}, "allowed_suffix": {"y.example": true}}),
                    1,
                    [true; 5],
                    [true, true, false, true, true],
                ),
                // z.example is blocked now; a block of a.y.example's subdomains meets
                // b.a.y.example only.
                (
                    serde_json::json!({"allowed_exact": {"x.example": true}, "allowed_suffix": {"y.example": true},
                        "blocked_exact": {"z.example": true}, "blocked_suffix": {"a.y.example": true}}),
                    1,
                    [true, true, false, true, false],
                    [true, true, false, true, false],
                ),
                // A wildcard of every domain's parent: all are taken again.
                (
                    serde_json::json!({"allowed_suffix": {"example": true}}),
                    1,
                    [false; 5],
                    [true; 5],
                ),
                // A priority that keeps pa above pc: every decision stands.
                (
                    serde_json::json!({"allowed_suffix": {"example": true}}),
                    2,
                    [true; 5],
                    [true; 5],
                ),
                // pa now ties with pc, which orders the policies anew: all are taken
                // again.
                (
                    serde_json::json!({"allowed_suffix": {"example": true}}),
                    0,
                    [false; 5],
                    [true; 5],
                ),
            ] {
                let mut next =
                    CompiledPolicy::compile_with(&bundle(edit, priority, custom), &mut cache)
                        .unwrap();
                next.inherit_memo(&mut policy);
                policy = next;
                t += SECOND;
                let got = ask(&mut policy, t);
                // With custom Rego on the agent's policies, any change takes all again.
                let kept = if custom { [false; 5] } else { kept };
                assert_eq!(
                    got.iter().map(|d| d.0).collect::<Vec<_>>(),
                    kept,
                    "custom {custom}"
                );
                assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), allowed);
            }
        }
    }

    /// The random configurations of the delta differential tests: 48 agents and 7
    /// policies (some with a window in Paris) edited at random, Paris now and then left
    /// out of the bundle (a policy may lose its table), and now and then a broken agent.
    struct Chain {
        next: Box<dyn FnMut(u64) -> u64>,
        agents: BTreeMap<String, serde_json::Value>,
        policies: BTreeMap<String, serde_json::Value>,
    }

    impl Chain {
        fn new(seed: u64) -> Self {
            let agents = (0..40)
                .map(|i| (format!("{i:02x}"), Self::agent(i, i % 6)))
                .collect();
            let policies = (0..6)
                .map(|i| (format!("p{i}"), Self::policy(i, i, i == 2)))
                .collect();
            Self {
                next: Box::new(crate::test_rng(seed)),
                agents,
                policies,
            }
        }

        fn policy(i: u64, v: u64, tz: bool) -> serde_json::Value {
            let mut p = serde_json::json!({
                "id": format!("p{i}"), "status": "active", "priority": v % 5,
                "allowed_exact": {format!("d{}.example", v % 3): true},
                "rules": [{"id": "r", "action": "deny", "priority": 1,
                    "conditions": [{"field": "method", "operator": "equals", "value": "DELETE"}]}],
            });
            if tz {
                p["timezone"] = serde_json::json!("Europe/Paris");
                p["windows"] =
                    serde_json::json!([{"days": ["mon", "tue"], "start": v % 600, "end": 1200}]);
            }
            p
        }

        fn agent(v: u64, p: u64) -> serde_json::Value {
            let status = ["active", "active", "suspended"][(v % 3) as usize];
            serde_json::json!({"id": "a", "tenant_id": "t", "name": format!("n{v}"), "status": status, "policies": [format!("p{p}")]})
        }

        /// The full configuration of `version` with the current entries.
        fn config(&self, version: u64, paris: bool) -> Vec<u8> {
            let timezones = match paris {
                true => serde_json::json!({"Europe/Paris": [[0, 60]]}),
                false => serde_json::json!({}),
            };
            serde_json::to_vec(&serde_json::json!({
                "version": version.to_string(),
                "mode": "enforce",
                "bundle": {
                    "modules": CompiledPolicy::library_modules(),
                    "data": {"agents": self.agents, "policies": self.policies, "timezones": timezones},
                },
            }))
            .unwrap()
        }

        /// Edits the entries; returns `version`'s configuration and whether it has a
        /// broken entry.
        fn step(&mut self, version: u64) -> (Vec<u8>, bool) {
            let next = &mut self.next;
            for _ in 0..=next(3) {
                let key = format!("{:02x}", next(48));
                let agent = Self::agent(version + next(3), next(7));
                self.agents.insert(key, agent);
            }
            if next(2) == 0 {
                let i = next(7);
                let policy = Self::policy(i, version, next(3) == 0);
                self.policies.insert(format!("p{i}"), policy);
            }
            let broken = next(12) == 0;
            if broken {
                self.agents
                    .insert("ff".into(), serde_json::json!({"status": "sleeping"}));
            }
            let paris = next(10) != 0;
            (self.config(version, paris), broken)
        }

        /// What the control plane sends after a refusal: `version` mended, in full.
        fn mended(&mut self, version: u64) -> Vec<u8> {
            self.agents.remove("ff");
            self.config(version, true)
        }
    }

    /// `got` has the entries, reads, tables and modules of `fresh` and decides three
    /// requests of every agent alike.
    fn assert_decides_alike(
        got: &mut CompiledPolicy,
        fresh: &mut CompiledPolicy,
        chain: &Chain,
        version: u64,
    ) {
        assert_eq!(
            got.entries.document(),
            fresh.entries.document(),
            "version {version}"
        );
        assert_eq!(got.reads, fresh.reads, "version {version}");
        assert_eq!(got.tables, fresh.tables, "version {version}");
        assert_eq!(got.modules.key, fresh.modules.key);
        let at = 1_773_076_200 * SECOND;
        for fp in chain.agents.keys() {
            for (domain, method) in [
                ("d0.example", "GET"),
                ("d1.example", "DELETE"),
                ("d2.example", "GET"),
            ] {
                let request = RequestFacts {
                    fingerprint: fp.as_str().into(),
                    domain: domain.into(),
                    method: method.into(),
                    unix_ns: at,
                    ..RequestFacts::default()
                };
                let (a, b) = (got.evaluate(&request), fresh.evaluate(&request));
                assert_eq!(
                    format!("{a:?}"),
                    format!("{b:?}"),
                    "version {version}, {fp} {domain}"
                );
            }
        }
    }

    /// Fails the test: one side accepted the configuration, the other refused it.
    fn verdicts_differ<A, B>(
        version: u64,
        got: Result<A, PolicyError>,
        fresh: Result<B, PolicyError>,
    ) -> ! {
        panic!(
            "version {version}: {:?} against {:?}",
            got.err(),
            fresh.err()
        )
    }

    /// A fresh VM's compilation of a whole configuration.
    fn whole(config: &[u8], validated: &Validated) -> Result<CompiledPolicy, PolicyError> {
        let whole = crate::config::RawPluginConfig::from_slice(config).unwrap();
        CompiledPolicy::compile_raw(
            whole.bundle.as_ref().unwrap(),
            &mut EntryCache::default(),
            validated,
        )
    }

    /// A chain of random pushes, each sent as a delta where the control plane would: a
    /// VM that compiles each delta from what it lists, on the entries it prepared for
    /// the previous version, ends up with the entries, reads and decisions of a fresh VM
    /// compiling the whole configuration; a delta whose kept policy lost its timezone's
    /// table is handed back to be merged, and a broken entry is refused either way.
    #[test]
    fn a_delta_compiled_from_what_it_lists_equals_the_whole_configuration() {
        use crate::config::RawPluginConfig;
        use crate::delta::{Retained, delta};
        let mut chain = Chain::new(0x9e37_79b9_7f4a_7c15_u64);
        let nothing = Validated::default();
        let mut previous = chain.config(1, true);
        let first = RawPluginConfig::from_slice(&previous).unwrap();
        let mut cache = EntryCache::default();
        CompiledPolicy::compile_raw(first.bundle.as_ref().unwrap(), &mut cache, &nothing).unwrap();
        let mut retained = Retained::keep(&first).unwrap();
        let (mut listed, mut merged, mut refused) = (0, 0, 0);
        for version in 2..80 {
            let (full, broken) = chain.step(version);
            let Some(change) = delta(&previous, &full).unwrap() else {
                continue;
            };
            let fresh = whole(&full, &nothing);
            let change = RawPluginConfig::from_slice(&change).unwrap();
            let changes = retained.changes(&change).unwrap();
            let got = CompiledPolicy::compile_raw_delta(
                change.bundle.as_ref().unwrap(),
                &mut cache,
                &nothing,
            );
            let got = match got {
                Ok(Some(got)) => {
                    listed += 1;
                    Ok(got)
                }
                Ok(None) => {
                    // What the filter does then: merge, compile the whole.
                    merged += 1;
                    let (whole, _) = retained.merge(change).unwrap();
                    CompiledPolicy::compile_raw(
                        whole.bundle.as_ref().unwrap(),
                        &mut cache,
                        &nothing,
                    )
                }
                Err(e) => Err(e),
            };
            match (got, fresh) {
                (Ok(mut got), Ok(mut fresh)) => {
                    assert_decides_alike(&mut got, &mut fresh, &chain, version);
                }
                (Err(got), Err(fresh)) => {
                    assert_eq!(got.to_string(), fresh.to_string(), "version {version}");
                    refused += 1;
                    // Envoy keeps the previous version; the control plane sends the next
                    // in full. The VM's entries are the refused one's or the previous
                    // version's: a whole configuration is right on either.
                    let full = chain.mended(version);
                    let whole = RawPluginConfig::from_slice(&full).unwrap();
                    CompiledPolicy::compile_raw(
                        whole.bundle.as_ref().unwrap(),
                        &mut cache,
                        &nothing,
                    )
                    .unwrap();
                    retained = Retained::keep(&whole).unwrap();
                    previous = full;
                    continue;
                }
                (got, fresh) => verdicts_differ(version, got, fresh),
            }
            assert!(!broken, "version {version}");
            retained.apply(changes);
            previous = full;
        }
        assert!(
            listed > 20 && merged > 2 && refused > 2,
            "{listed} listed, {merged} merged, {refused} refused"
        );
    }

    /// The same chain through Envoy's configuration canary, a fresh VM per push that
    /// reads the entries and the validated set the previous canary published: a delta
    /// it accepts with `check_delta` is one the whole configuration compiles, the set it
    /// publishes lets a fresh VM compile the whole configuration without validating
    /// anything again, and that VM decides as one compiling it from scratch. Every
    /// delta `check_delta` hands back (a broken entry, a policy that lost its table, a
    /// set without the base's facts) is merged, and refused or accepted as the whole is.
    #[test]
    fn a_delta_checked_against_the_published_entries_is_accepted_as_the_whole_configuration() {
        use crate::config::RawPluginConfig;
        use crate::delta::{Retained, delta};
        let mut chain = Chain::new(0x2545_f491_4f6c_dd1d_u64);
        let nothing = Validated::default();
        let mut previous = chain.config(1, true);
        let mut published = Retained::keep(&RawPluginConfig::from_slice(&previous).unwrap())
            .unwrap()
            .encode();
        let mut validated = whole(&previous, &nothing).unwrap().validated();
        let (mut checked, mut merged, mut refused) = (0, 0, 0);
        let mut complete = true;
        for version in 2..120 {
            let (full, broken) = chain.step(version);
            let Some(change) = delta(&previous, &full).unwrap() else {
                continue;
            };
            let fresh = whole(&full, &nothing);
            let change = RawPluginConfig::from_slice(&change).unwrap();
            let mut retained = Retained::decode(published.clone()).unwrap();
            let changes = retained.changes(&change).unwrap();
            // Now and then another VM's set replaced the previous canary's (here: none).
            // A set covers a configuration's entries until a canary extends one that does
            // not; a VM that validates a whole configuration publishes all of its entries.
            let (set, covered) = match version % 7 {
                0 => (Validated::default(), false),
                _ => (Validated::decode(&validated), complete),
            };
            let timezones = change.bundle.as_ref().unwrap().data.timezones.clone();
            match (CompiledPolicy::check_delta(&retained, &change, &set), fresh) {
                (Some(got), Ok(mut fresh)) => {
                    checked += 1;
                    retained.apply(changes);
                    // A fresh VM that later decides requests compiles the whole from what
                    // the canary kept and published, validating nothing again (when the
                    // set the canary extended covered its base).
                    let set = Validated::decode(&got.validated);
                    let mut later = CompiledPolicy::compile_raw(
                        &retained.bundle(timezones),
                        &mut EntryCache::default(),
                        &set,
                    )
                    .unwrap();
                    if covered {
                        assert_eq!(later.validated_here(), (0, 0, 0), "version {version}");
                    }
                    complete = covered;
                    assert_decides_alike(&mut later, &mut fresh, &chain, version);
                    validated = got.validated;
                }
                (Some(_), Err(e)) => panic!("version {version}: accepted, but the whole: {e}"),
                (None, fresh) => {
                    let (merged_config, _) = retained.merge(change).unwrap();
                    let got = CompiledPolicy::compile_raw(
                        merged_config.bundle.as_ref().unwrap(),
                        &mut EntryCache::default(),
                        &set,
                    );
                    match (got, fresh) {
                        (Ok(got), Ok(_)) => {
                            merged += 1;
                            complete = true;
                            validated = got.validated();
                            retained.apply(changes);
                        }
                        // Refused either way; with several faults, each may name
                        // another first (the merged configuration lists the delta's
                        // entries last).
                        (Err(_), Err(_)) => {
                            refused += 1;
                            complete = true;
                            let full = chain.mended(version);
                            let config = RawPluginConfig::from_slice(&full).unwrap();
                            validated = whole(&full, &nothing).unwrap().validated();
                            published = Retained::keep(&config).unwrap().encode();
                            previous = full;
                            continue;
                        }
                        (got, fresh) => verdicts_differ(version, got, fresh),
                    }
                }
            }
            assert!(!broken, "version {version}");
            published = retained.encode();
            previous = full;
        }
        assert!(
            checked > 30 && merged > 2 && refused > 2,
            "{checked} checked, {merged} merged, {refused} refused"
        );
    }
}
