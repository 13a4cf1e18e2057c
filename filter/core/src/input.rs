//! The request facts the filter gathers, and the Rego `input` document built from them.
//!
//! The document's shape is a contract (`docs/contracts.md`):
//! `{agent: {fingerprint, subject}, request: {domain, method, path, user_agent, source_ip,
//! scheme}, time: {unix_ns, local: {<timezone>: {day, prev_day, minute, hour,
//! minute_of_hour}}}, bundle: {agent?, policies: {<id>: policy}}}`: `bundle` holds the
//! bundle's entry for the request's agent (absent when the fingerprint is unknown) and
//! the entries of the policies it names, looked up by the core.

use crate::data::Entries;
use crate::time::OffsetTable;
use regorus::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Facts about one request, as read from Envoy. The strings borrow where they can: the
/// filter reads them from the request's header map and its connection's cached peer,
/// and copies only what it has to change (one allocation each costs in wasm).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// Lower-case hex SHA-256 of the verified peer certificate; empty without one.
    pub fingerprint: Cow<'a, str>,
    pub subject: Cow<'a, str>,
    /// Normalised with [`normalize_domain`].
    pub domain: Cow<'a, str>,
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    pub user_agent: Cow<'a, str>,
    pub source_ip: Cow<'a, str>,
    pub scheme: Cow<'a, str>,
    /// Envoy's clock, nanoseconds since the Unix epoch.
    pub unix_ns: u64,
}

/// Normalises an `:authority` into the domain policies match: lower case, port stripped,
/// trailing dot removed, IPv6 brackets kept off. Borrows `authority` unless a letter
/// needs lowering.
pub fn normalize_domain(authority: &str) -> Cow<'_, str> {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: "[::1]:443" or "[::1]".
        rest.split(']').next().unwrap_or_default()
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        }
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Strips the peer address's port: Envoy's `source.address` is `ip:port`.
pub fn source_ip(address: &str) -> String {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    match address.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            ip.to_owned()
        }
        _ => address.to_owned(),
    }
}

/// The request header in which the gateway's Envoy names the request's downstream
/// connection, `<token>:<connection id>`: the listener's early header mutation writes it
/// over whatever a client sent (`envoy-config/README.md`, "Identity"). With it the filter
/// finds the connection's peer without a host call.
pub const PEER_HEADER: &str = "x-chronoguard-peer";

/// Envoy's environment variable holding the token: the listener's mutation writes it with
/// `%ENVIRONMENT(...)%` and the VM receives it through `vm_config.environment_variables`.
pub const PEER_TOKEN_ENV: &str = "CHRONOGUARD_PEER_TOKEN";

/// The shortest token the filter accepts: a client that could send the header (a
/// bootstrap without the mutation) must not be able to guess it.
pub const MIN_PEER_TOKEN: usize = 16;

/// The connection id a [`PEER_HEADER`] value names, if the value starts with `token` (so
/// Envoy wrote it); `None` for an empty token, another token or a malformed id. The token
/// is compared in constant time: a client must not learn it byte by byte.
pub fn peer_connection(value: &[u8], token: &[u8]) -> Option<u64> {
    if token.is_empty() || value.len() <= token.len() {
        return None;
    }
    let (claimed, rest) = value.split_at(token.len());
    let differ = claimed
        .iter()
        .zip(token)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    let id = rest.strip_prefix(b":")?;
    if differ != 0 || id.is_empty() || id.len() > 20 || !id.iter().all(u8::is_ascii_digit) {
        return None;
    }
    id.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

// === impl RequestFacts ===

impl RequestFacts<'_> {
    /// Builds the Rego input directly as a regorus value (no JSON text on the request
    /// path), with the local time in every timezone of `tables` and the request's agent
    /// and its policies from `entries` (shared values, not copies).
    pub fn to_value(&self, tables: &BTreeMap<String, OffsetTable>, entries: &Entries) -> Value {
        let agent = object([
            ("fingerprint", self.fingerprint.as_ref().into()),
            ("subject", self.subject.as_ref().into()),
        ]);
        let request = object([
            ("domain", self.domain.as_ref().into()),
            ("method", self.method.as_ref().into()),
            ("path", self.path.as_ref().into()),
            ("user_agent", self.user_agent.as_ref().into()),
            ("source_ip", self.source_ip.as_ref().into()),
            ("scheme", self.scheme.as_ref().into()),
        ]);
        let unix_s = i64::try_from(self.unix_ns / 1_000_000_000).unwrap_or(i64::MAX);
        let local: BTreeMap<Value, Value> = tables
            .iter()
            .map(|(tz, table)| {
                let t = table.local(unix_s);
                let local = object([
                    ("day", t.day_name().into()),
                    ("prev_day", t.prev_day_name().into()),
                    ("minute", u64::from(t.minute).into()),
                    ("hour", u64::from(t.minute / 60).into()),
                    ("minute_of_hour", u64::from(t.minute % 60).into()),
                ]);
                (Value::from(tz.as_str()), local)
            })
            .collect();
        let time = object([
            // Time inputs have minute resolution: that is what lets decisions be
            // memoised (policy.rs).
            (
                "unix_ns",
                (self.unix_ns - self.unix_ns % crate::time::MINUTE_NS).into(),
            ),
            ("local", Value::from(local)),
        ]);
        let mut bundle = BTreeMap::new();
        let mut policies = BTreeMap::new();
        if let Some(record) = entries.agent(&self.fingerprint) {
            for (id, entry) in entries.named_policies(record) {
                if let Some(policy) = entry.and_then(|p| p.value().ok()) {
                    policies.insert(id.clone(), policy.clone());
                }
            }
            bundle.insert(Value::from("agent"), record.clone());
        }
        bundle.insert(Value::from("policies"), Value::from(policies));
        object([
            ("agent", agent),
            ("request", request),
            ("time", time),
            ("bundle", Value::from(bundle)),
        ])
    }
}

fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    let map: BTreeMap<Value, Value> = fields
        .into_iter()
        .map(|(key, value)| (Value::from(key), value))
        .collect();
    Value::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_header_is_believed_only_with_the_token() {
        let token = b"0123456789abcdef0123";
        for (value, want) in [
            (&b"0123456789abcdef0123:42"[..], Some(42)),
            (b"0123456789abcdef0123:0", Some(0)),
            (b"0123456789abcdef0123:18446744073709551615", Some(u64::MAX)),
            // Another token, one byte off, a prefix of it, or none at all.
            (b"0123456789abcdef0124:42", None),
            (b"x123456789abcdef0123:42", None),
            (b"0123456789abcdef:42", None),
            (b"42", None),
            (b"", None),
            // Envoy writes `-` for an unset variable.
            (b"-:42", None),
            // Malformed ids.
            (b"0123456789abcdef0123:", None),
            (b"0123456789abcdef0123", None),
            (b"0123456789abcdef0123;42", None),
            (b"0123456789abcdef0123:4 2", None),
            (b"0123456789abcdef0123:-1", None),
            (b"0123456789abcdef0123:18446744073709551616", None),
            (b"0123456789abcdef0123:000000000000000000001", None),
        ] {
            assert_eq!(
                peer_connection(value, token),
                want,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        // Without a token nothing is believed.
        assert_eq!(peer_connection(b":42", b""), None);
        assert_eq!(peer_connection(b"0123456789abcdef0123:42", b""), None);
    }

    #[test]
    fn domains_are_normalised() {
        for (raw, want) in [
            ("Example.COM", "example.com"),
            ("example.com:8443", "example.com"),
            ("example.com.", "example.com"),
            ("Example.com.:443", "example.com"),
            ("[::1]:443", "::1"),
            ("[::1]", "::1"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("", ""),
        ] {
            assert_eq!(normalize_domain(raw), want, "{raw}");
        }
    }

    #[test]
    fn source_ip_drops_port() {
        assert_eq!(source_ip("127.0.0.1:5555"), "127.0.0.1");
        assert_eq!(source_ip("[::1]:5555"), "::1");
        assert_eq!(source_ip("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn input_document_has_contract_shape() {
        let facts = RequestFacts {
            fingerprint: "ab".into(),
            domain: "example.com".into(),
            unix_ns: 120_000_000_007,
            ..RequestFacts::default()
        };
        let tables = crate::time::tables_from_json(None).unwrap();
        let entries = crate::data::prepare_values(
            &serde_json::json!({
                "agents": {"AB": {"id": "a", "tenant_id": "t", "name": "n", "status": "active", "policies": ["p", "gone"]}},
                "policies": {
                    "p": {"id": "p", "priority": 1, "status": "active"},
                    "q": {"id": "q", "priority": 1, "status": "active"}
                }
            }),
            &mut crate::data::EntryCache::default(),
        )
        .unwrap()
        .entries;
        let json = serde_json::to_value(facts.to_value(&tables, &entries)).unwrap();
        assert_eq!(json["agent"]["fingerprint"], "ab");
        assert_eq!(json["request"]["domain"], "example.com");
        // Minute resolution: the start of the minute.
        assert_eq!(json["time"]["unix_ns"], 120_000_000_000_u64);
        assert_eq!(json["time"]["local"]["UTC"]["day"], "thu");
        assert_eq!(json["time"]["local"]["UTC"]["prev_day"], "wed");
        // The agent's entry (fingerprints are matched in lower case) and the policies it
        // names that exist; other policies are not there.
        assert_eq!(json["bundle"]["agent"]["id"], "a");
        let policies = json["bundle"]["policies"].as_object().unwrap();
        assert_eq!(policies.keys().collect::<Vec<_>>(), ["p"]);
        // An unknown agent: no entry, no policies.
        let stranger = RequestFacts {
            fingerprint: "cd".into(),
            ..facts
        };
        let json = serde_json::to_value(stranger.to_value(&tables, &entries)).unwrap();
        assert_eq!(json["bundle"], serde_json::json!({"policies": {}}));
    }
}
