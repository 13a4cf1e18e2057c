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
    pub modules: Vec<RegoModule>,
    #[serde(borrow)]
    pub data: RawData<'a>,
}

/// The data document with agents and policies as JSON text, keyed like [`Bundle::data`],
/// in document order (a later duplicate key wins where they are used, as in a map).
#[derive(Debug, Deserialize)]
pub struct RawData<'a> {
    #[serde(default, borrow, deserialize_with = "members")]
    pub agents: Vec<(Cow<'a, str>, &'a RawValue)>,
    #[serde(default, borrow, deserialize_with = "members")]
    pub policies: Vec<(Cow<'a, str>, &'a RawValue)>,
    #[serde(default)]
    pub timezones: Option<serde_json::Value>,
}

/// A JSON object's members, values as borrowed text and keys borrowed unless escaped: a
/// configuration's thousands of entries are listed without a map or a copy.
fn members<'de, D>(d: D) -> Result<Vec<(Cow<'de, str>, &'de RawValue)>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Members;
    struct Key<'de>(Cow<'de, str>);
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some((Key(key), value)) = map.next_entry()? {
                members.push((key, value));
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    /// Entries are listed in document order with their text; keys are borrowed unless
    /// escaped; a non-object is an error.
    #[test]
    fn raw_data_lists_members_in_order() {
        let data: RawData<'_> =
            serde_json::from_str(r#"{"agents": {"b": {"x": 1}, "a\u0062": [2], "b": 3}}"#).unwrap();
        let agents: Vec<(&str, &str, bool)> = data
            .agents
            .iter()
            .map(|(k, v)| (k.as_ref(), v.get(), matches!(k, Cow::Borrowed(_))))
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
