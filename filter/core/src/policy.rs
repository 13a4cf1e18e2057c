//! Compiling a policy bundle once and evaluating requests against it with regorus.
//!
//! [`CompiledPolicy::evaluate`] memoises decisions per VM, keyed on exactly the request
//! facts the bundle reads (identity, domain, the fields rule conditions test) and the UTC
//! minute: every time-dependent input (local day, hour, minute, window membership) is
//! constant within one UTC minute because offsets are whole minutes. A new configuration
//! builds a new `CompiledPolicy`, so the memo never outlives its bundle. Rate limits and
//! audit stay outside the memo.

use crate::config::{Bundle, RawBundle, RegoModule};
use crate::data::{self, EntryCache, Reads};
use crate::decision::Decision;
use crate::input::RequestFacts;
use crate::time::OffsetTable;
use crate::{DECISION_RULE, REGO_LIBRARY};
use regorus::{Engine, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
    minute: u64,
}

// === impl MemoKey ===

impl MemoKey {
    fn new(facts: &RequestFacts, reads: &Reads) -> Self {
        let pick = |read: bool, value: &str| read.then(|| value.to_owned());
        Self {
            fingerprint: facts.fingerprint.clone(),
            domain: facts.domain.clone(),
            method: pick(reads.method, &facts.method),
            path: pick(reads.path, &facts.path),
            user_agent: pick(reads.user_agent, &facts.user_agent),
            source_ip: pick(reads.source_ip, &facts.source_ip),
            minute: facts.unix_ns / 60_000_000_000,
        }
    }

    /// Compares without allocating.
    fn matches(&self, facts: &RequestFacts, reads: &Reads) -> bool {
        let same = |read: bool, stored: &Option<String>, value: &str| {
            !read || stored.as_deref() == Some(value)
        };
        self.minute == facts.unix_ns / 60_000_000_000
            && self.fingerprint == facts.fingerprint
            && self.domain == facts.domain
            && same(reads.method, &self.method, &facts.method)
            && same(reads.path, &self.path, &facts.path)
            && same(reads.user_agent, &self.user_agent, &facts.user_agent)
            && same(reads.source_ip, &self.source_ip, &facts.source_ip)
    }
}

/// FNV-1a over the memo's fields: cheap in wasm, and collisions only cost a comparison.
fn memo_hash(facts: &RequestFacts, reads: &Reads) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Field separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    };
    eat(facts.fingerprint.as_bytes());
    eat(facts.domain.as_bytes());
    if reads.method {
        eat(facts.method.as_bytes());
    }
    if reads.path {
        eat(facts.path.as_bytes());
    }
    if reads.user_agent {
        eat(facts.user_agent.as_bytes());
    }
    if reads.source_ip {
        eat(facts.source_ip.as_bytes());
    }
    eat(&(facts.unix_ns / 60_000_000_000).to_le_bytes());
    hash
}

/// A bundle compiled once per configuration; evaluation never parses or compiles.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    engine: Engine,
    tables: BTreeMap<String, OffsetTable>,
    reads: Reads,
    memo: HashMap<u64, Vec<(MemoKey, Arc<Decision>)>>,
    memo_len: usize,
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
        Self::build(&bundle.modules, prepared)
    }

    /// [`CompiledPolicy::compile_with`] for the filter's configuration, whose agents and
    /// policies are still JSON text: unchanged entries are not even parsed.
    pub fn compile_raw(
        bundle: &RawBundle<'_>,
        cache: &mut EntryCache,
    ) -> Result<Self, PolicyError> {
        let prepared = data::prepare_raw(&bundle.data, cache).map_err(PolicyError::Data)?;
        Self::build(&bundle.modules, prepared)
    }

    /// Compiles `modules` against the prepared data and checks the decision rule by
    /// evaluating it once on an empty request.
    fn build(modules: &[RegoModule], prepared: data::PreparedValues) -> Result<Self, PolicyError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        let mut custom_modules = Vec::new();
        for module in modules {
            let package = engine
                .add_policy(module.name.clone(), module.source.clone())
                .map_err(|e| PolicyError::Compile {
                    module: module.name.clone(),
                    message: e.to_string(),
                })?;
            let expected = match custom_key(&module.name) {
                Some(key) => {
                    custom_modules.push(key.to_owned());
                    format!("data.chronoguard.custom.{key}")
                }
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
        if let Some(missing) = prepared
            .custom_keys
            .iter()
            .find(|k| !custom_modules.contains(k))
        {
            return Err(PolicyError::Data(format!(
                "a policy refers to custom module {missing:?} but the bundle has no module custom/{missing}.rego"
            )));
        }
        // Prepared straight into regorus values: no JSON text round trip (on_configure
        // time is part of every policy push).
        engine
            .add_data(prepared.data)
            .map_err(|e| PolicyError::Data(e.to_string()))?;
        let mut compiled = Self {
            engine,
            tables: prepared.tables,
            reads: prepared.reads,
            memo: HashMap::new(),
            memo_len: 0,
        };
        compiled.evaluate_fresh(&RequestFacts::default())?;
        Ok(compiled)
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

    /// Evaluates one request, from the memo when the same facts were decided in the same
    /// UTC minute.
    pub fn evaluate(&mut self, facts: &RequestFacts) -> Result<Decision, PolicyError> {
        self.evaluate_memo(facts)
            .map(|(decision, _)| (*decision).clone())
    }

    /// Like [`CompiledPolicy::evaluate`], sharing the memoised decision instead of copying
    /// it, and telling whether the memo answered. A hit allocates nothing.
    pub fn evaluate_memo(
        &mut self,
        facts: &RequestFacts,
    ) -> Result<(Arc<Decision>, bool), PolicyError> {
        let hash = memo_hash(facts, &self.reads);
        if let Some(bucket) = self.memo.get(&hash)
            && let Some((_, decision)) = bucket
                .iter()
                .find(|(key, _)| key.matches(facts, &self.reads))
        {
            return Ok((decision.clone(), true));
        }
        let decision = Arc::new(self.evaluate_fresh(facts)?);
        if self.memo_len >= MEMO_CAPACITY {
            self.memo.clear();
            self.memo_len = 0;
        }
        self.memo
            .entry(hash)
            .or_default()
            .push((MemoKey::new(facts, &self.reads), decision.clone()));
        self.memo_len += 1;
        Ok((decision, false))
    }

    /// Evaluates one request with regorus, bypassing the memo.
    pub fn evaluate_fresh(&mut self, facts: &RequestFacts) -> Result<Decision, PolicyError> {
        self.engine.set_input(facts.to_value(&self.tables));
        let value = self
            .engine
            .eval_rule(DECISION_RULE.to_owned())
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        decision_from_value(&value)
    }

    /// Memoised decisions currently held.
    pub fn memo_len(&self) -> usize {
        self.memo_len
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
}
