//! The parts of a policy beyond its domain lists: rule conditions, time restrictions, rate
//! limits and custom Rego (see rego/README.md for their semantics).
//!
//! Every write is validated by compiling a bundle holding just this policy with the
//! filter's own core, so what the API accepts is exactly what Envoy can run; Rego errors
//! keep regorus's `file:line:col`.

use crate::bundle::{BundleError, compile_rows};
use crate::storage::bundle::PolicyRow;
use filter_core::policy::CompiledPolicy;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Optional policy fields, as accepted and returned by the REST API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// `[{"id", "priority", "action": "allow"|"deny", "conditions": [{"field", "operator",
    /// "value"}]}]`.
    #[serde(default)]
    pub rules: Vec<Value>,
    /// `{"timezone": "<IANA name>", "windows": [{"days": ["mon", ...], "start": "HH:MM",
    /// "end": "HH:MM"}]}`; absent means always.
    #[serde(default)]
    pub time_restrictions: Option<Value>,
    /// `{"per_minute", "per_hour", "per_day", "burst"}`.
    #[serde(default)]
    pub rate_limit: Option<Value>,
    /// A Rego module whose `deny` set adds deny reasons; its package line is replaced
    /// by the policy's own package.
    #[serde(default)]
    pub custom_rego: Option<String>,
}

/// Which field a validation problem belongs to, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

// === impl PolicySpec ===

impl PolicySpec {
    /// Gives rules without an id a stable one (`rule-<n>`).
    pub fn normalise(&mut self) {
        for (i, rule) in self.rules.iter_mut().enumerate() {
            if let Some(rule) = rule.as_object_mut()
                && !rule.contains_key("id")
            {
                rule.insert("id".into(), Value::String(format!("rule-{}", i + 1)));
            }
        }
        if self
            .custom_rego
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            self.custom_rego = None;
        }
    }

    /// Compiles a bundle holding only this policy with the filter's core.
    pub fn validate(&self, allowed: &[String], blocked: &[String]) -> Result<(), SpecError> {
        let row = PolicyRow {
            id: Uuid::nil(),
            tenant_id: Uuid::nil(),
            name: String::new(),
            priority: 0,
            status: "active".into(),
            mode: "enforce".into(),
            allowed_domains: allowed.to_vec(),
            blocked_domains: blocked.to_vec(),
            rules: Value::Array(self.rules.clone()),
            time_restrictions: self.time_restrictions.clone(),
            rate_limit: self.rate_limit.clone(),
            custom_rego: self.custom_rego.clone(),
        };
        let bundle = compile_rows(Vec::new(), vec![row], chrono::Utc::now().timestamp())
            .map_err(|e| self.blame(e.to_string()))?;
        CompiledPolicy::compile(&bundle)
            .map(|_| ())
            .map_err(|e| self.blame(BundleError::Invalid(e).to_string()))
    }

    /// Attributes a compiler message to the field it is about.
    fn blame(&self, message: String) -> SpecError {
        let message = message.replace(&format!("policy {}: ", Uuid::nil()), "");
        let field = if message.contains("custom/") || message.contains("custom module") {
            "custom_rego"
        } else if message.contains("rule") {
            "rules"
        } else if message.contains("rate_limit") {
            "rate_limit"
        } else if message.contains("window")
            || message.contains("timezone")
            || message.contains("day")
        {
            "time_restrictions"
        } else {
            "policy"
        };
        SpecError { field, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> PolicySpec {
        let mut spec: PolicySpec = serde_json::from_value(value).unwrap();
        spec.normalise();
        spec
    }

    #[test]
    fn valid_spec_passes() {
        let s = spec(json!({
            "rules": [{"action": "deny", "conditions": [{"field": "method", "operator": "in", "value": ["DELETE"]}]}],
            "time_restrictions": {"timezone": "America/New_York", "windows": [{"days": ["mon"], "start": "09:00", "end": "17:00"}]},
            "rate_limit": {"per_minute": 10},
            "custom_rego": "package x\nimport rego.v1\ndeny contains \"y\" if false\n"
        }));
        assert_eq!(s.rules[0]["id"], "rule-1");
        s.validate(&["a.example".into()], &[]).unwrap();
    }

    #[test]
    fn problems_name_their_field() {
        for (value, field, needle) in [
            (
                json!({"rules": [{"action": "allow", "conditions": [{"field": "colour", "operator": "equals", "value": 1}]}]}),
                "rules",
                "unknown condition field",
            ),
            (
                json!({"time_restrictions": {"timezone": "Mars/Olympus"}}),
                "time_restrictions",
                "unknown IANA timezone",
            ),
            (
                json!({"time_restrictions": {"windows": [{"days": ["mon"], "start": "9am", "end": "17:00"}]}}),
                "time_restrictions",
                "HH:MM",
            ),
            (
                json!({"rate_limit": {"per_minute": -1}}),
                "rate_limit",
                "positive integer",
            ),
            (
                json!({"custom_rego": "package x\ndeny contains y if {\n"}),
                "custom_rego",
                "custom/",
            ),
        ] {
            let err = spec(value.clone()).validate(&[], &[]).unwrap_err();
            assert_eq!(err.field, field, "{value}: {err:?}");
            assert!(err.message.contains(needle), "{value}: {err:?}");
        }
    }
}
