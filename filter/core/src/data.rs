//! Validation and normalisation of the bundle's data document at configure time.
//!
//! Everything the Rego library relies on is checked here, so a broken bundle is refused
//! in `on_configure` (and by the control plane before rollout), never discovered on a
//! request: unknown condition fields or operators, bad regexes and CIDRs, windows out of
//! range, timezones without an offset table. Missing optional fields get their defaults
//! and rules are sorted (priority descending, then id) so Rego can take the first match.

use crate::time::{DAYS, OffsetTable, tables_from_json};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

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

/// Which request facts decisions depend on (besides identity, domain and time): the
/// memoisation key holds exactly these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    pub method: bool,
    pub path: bool,
    pub user_agent: bool,
    pub source_ip: bool,
}

/// The data document ready for regorus, plus what the core needs next to it.
#[derive(Debug)]
pub struct Prepared {
    pub data: Value,
    pub tables: BTreeMap<String, OffsetTable>,
    pub reads: Reads,
    /// Keys of custom modules policies refer to (`chronoguard.custom.<key>`).
    pub custom_keys: BTreeSet<String>,
}

/// Validates and normalises `data`; the error names the agent, policy or rule at fault.
pub fn prepare(data: &Value) -> Result<Prepared, String> {
    let object = data.as_object().ok_or("data must be an object")?;
    let tables = tables_from_json(object.get("timezones"))?;
    let mut reads = Reads::default();
    let mut custom_keys = BTreeSet::new();

    let mut agents = Map::new();
    for (fingerprint, agent) in object_field(object, "agents")? {
        let agent = prepare_agent(agent).map_err(|e| format!("agent {fingerprint}: {e}"))?;
        agents.insert(fingerprint.to_ascii_lowercase(), agent);
    }
    let mut policies = Map::new();
    for (id, policy) in object_field(object, "policies")? {
        let policy = prepare_policy(id, policy, &tables, &mut reads, &mut custom_keys)
            .map_err(|e| format!("policy {id}: {e}"))?;
        policies.insert(id.clone(), policy);
    }
    if !custom_keys.is_empty() {
        // Custom Rego may read any input field.
        reads = Reads {
            method: true,
            path: true,
            user_agent: true,
            source_ip: true,
        };
    }
    let mut out = Map::new();
    out.insert("agents".into(), Value::Object(agents));
    out.insert("policies".into(), Value::Object(policies));
    Ok(Prepared {
        data: Value::Object(out),
        tables,
        reads,
        custom_keys,
    })
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

fn prepare_policy(
    id: &str,
    policy: &Value,
    tables: &BTreeMap<String, OffsetTable>,
    reads: &mut Reads,
    custom_keys: &mut BTreeSet<String>,
) -> Result<Value, String> {
    let p = policy.as_object().ok_or("must be an object")?;
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
    if !tables.contains_key(timezone) {
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
    let mut rules = match p.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rs)) => rs
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r, reads))
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
            custom_keys.insert(key.clone());
            Value::String(key.clone())
        }
        Some(_) => return Err("custom must be a module key of [a-z0-9_]".into()),
    };
    Ok(json!({
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
        "allowed_domains": strings(p.get("allowed_domains"), "allowed_domains")?,
        "blocked_domains": strings(p.get("blocked_domains"), "blocked_domains")?,
    }))
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

fn rule(index: usize, r: &Value, reads: &mut Reads) -> Result<Value, String> {
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
            .map(|c| condition(c, reads).map_err(&err))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err("conditions must be an array".into())),
    };
    Ok(json!({"id": id, "priority": priority, "action": action, "conditions": conditions}))
}

fn condition(c: &Value, reads: &mut Reads) -> Result<Value, String> {
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
        ] {
            let err = prepare(&policy(extra.clone())).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
            assert!(err.starts_with("policy p"), "{err}");
        }
    }
}
