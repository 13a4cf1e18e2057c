//! Compiling a policy bundle once and evaluating requests against it with regorus.

use crate::config::Bundle;
use crate::decision::Decision;
use crate::input::RequestFacts;
use crate::{DECISION_RULE, REGO_LIBRARY};
use regorus::{Engine, Value};

/// Why a bundle could not be compiled or a request not evaluated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The message carries regorus's `file:line:col` position of the problem.
    #[error("rego module {module} does not compile: {message}")]
    Compile { module: String, message: String },
    #[error("policy data is invalid: {0}")]
    Data(String),
    #[error("evaluation failed: {0}")]
    Eval(String),
    #[error("decision has an unexpected shape: {0}")]
    Shape(String),
}

/// A bundle compiled once per configuration; evaluation never parses or compiles.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    engine: Engine,
}

// === impl CompiledPolicy ===

impl CompiledPolicy {
    /// Compiles the bundle's modules against its data and checks the decision rule exists
    /// by evaluating it once on an empty request.
    pub fn compile(bundle: &Bundle) -> Result<Self, PolicyError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        for module in &bundle.modules {
            engine
                .add_policy(module.name.clone(), module.source.clone())
                .map_err(|e| PolicyError::Compile {
                    module: module.name.clone(),
                    message: e.to_string(),
                })?;
        }
        let data =
            serde_json::to_string(&bundle.data).map_err(|e| PolicyError::Data(e.to_string()))?;
        let data = Value::from_json_str(&data).map_err(|e| PolicyError::Data(e.to_string()))?;
        engine
            .add_data(data)
            .map_err(|e| PolicyError::Data(e.to_string()))?;
        let mut compiled = Self { engine };
        compiled.evaluate(&RequestFacts::default())?;
        Ok(compiled)
    }

    /// The bundle modules for the built-in library: what the control plane ships.
    pub fn library_modules() -> Vec<crate::config::RegoModule> {
        REGO_LIBRARY
            .iter()
            .map(|(name, source)| crate::config::RegoModule {
                name: (*name).to_owned(),
                source: (*source).to_owned(),
            })
            .collect()
    }

    /// Evaluates one request.
    pub fn evaluate(&mut self, facts: &RequestFacts) -> Result<Decision, PolicyError> {
        self.engine.set_input(facts.to_value());
        let value = self
            .engine
            .eval_rule(DECISION_RULE.to_owned())
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        decision_from_value(&value)
    }
}

fn decision_from_value(value: &Value) -> Result<Decision, PolicyError> {
    if *value == Value::Undefined {
        return Err(PolicyError::Shape("decision is undefined".into()));
    }
    let allow = *value["allow"]
        .as_bool()
        .map_err(|_| PolicyError::Shape("allow is not a boolean".into()))?;
    let reason = value["reason"]
        .as_string()
        .map_err(|_| PolicyError::Shape("reason is not a string".into()))?
        .to_string();
    let optional = |key: &str| value[key].as_string().ok().map(|s| s.to_string());
    Ok(Decision {
        allow,
        reason,
        policy_id: optional("policy_id"),
        tenant_id: optional("tenant_id"),
        agent_id: optional("agent_id"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegoModule;

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
            name: "custom.rego".into(),
            source: "package custom\nallow if {\n".into(),
        });
        let err = CompiledPolicy::compile(&b).unwrap_err().to_string();
        assert!(err.contains("custom.rego"), "{err}");
        assert!(err.contains(":3:") || err.contains(":2:"), "{err}");
    }
}
