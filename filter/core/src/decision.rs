//! The outcome of one evaluation and how the filter answers with it.

use serde::{Deserialize, Serialize};

/// The decision the Rego library returns (`data.chronoguard.decision`), plus the
/// attribution the audit log needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allow: bool,
    /// Machine-readable reason code, e.g. `domain_allowed`, `domain_blocked`,
    /// `unknown_agent`, `not_configured`, `evaluation_error`.
    pub reason: String,
    #[serde(default)]
    pub policy_id: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The rule that decided, if a rule did.
    #[serde(default)]
    pub rule_id: Option<String>,
    /// The deciding policy's rate limit, applied by the filter to allowed requests.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// What dry-run policies would have decided, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
}

/// Requests per window for one agent under one policy; `burst` caps the per-minute bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct RateLimit {
    #[serde(default)]
    pub per_minute: Option<u32>,
    #[serde(default)]
    pub per_hour: Option<u32>,
    #[serde(default)]
    pub per_day: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// The decision dry-run policies would have made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRun {
    pub allow: bool,
    pub reason: String,
    #[serde(default)]
    pub policy_id: Option<String>,
    #[serde(default)]
    pub rule_id: Option<String>,
}

/// The JSON body of a deny response.
#[derive(Debug, Serialize)]
pub struct DenyBody<'a> {
    pub decision: &'static str,
    pub reason: &'a str,
    pub message: &'static str,
    pub policy_id: Option<&'a str>,
    pub rule_id: Option<&'a str>,
    pub request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

/// Reason code of a request over its rate limit (answered with 429).
pub const RATE_LIMITED: &str = "rate_limited";

/// Envoy's request id: the decision id when it is a UUID ([`decision_id`]). The route
/// copies it as `x-chronoguard-decision-id` onto allowed requests (joining upstream logs
/// with the audit log) and onto every response, local replies included (`envoy-config/`).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The decision id a request's `x-request-id` gives, if it is a UUID in the form Envoy
/// writes (lower-case hex, hyphenated: the form the audit chain hashes, so the id in
/// upstream logs equals the audited one). Envoy writes a fresh one on every request from
/// an external address (`use_remote_address: true`, `envoy-config/README.md`); any other
/// value, or none, makes the filter use an id of its own.
pub fn decision_id(request_id: &[u8]) -> Option<&str> {
    let shaped = request_id.len() == 36
        && request_id.iter().enumerate().all(|(at, b)| match at {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
        });
    shaped
        .then(|| std::str::from_utf8(request_id).ok())
        .flatten()
}

// === impl Decision ===

impl Decision {
    /// A decision that does not come from the policy (default configs, errors).
    pub fn fixed(allow: bool, reason: &str) -> Self {
        Self {
            allow,
            reason: reason.to_owned(),
            policy_id: None,
            tenant_id: None,
            agent_id: None,
            rule_id: None,
            rate_limit: None,
            dry_run: None,
        }
    }

    pub fn outcome(&self) -> &'static str {
        if self.allow { "allow" } else { "deny" }
    }

    /// HTTP status of the local reply for a denied request.
    pub fn status(&self) -> u32 {
        if self.reason == RATE_LIMITED {
            429
        } else {
            403
        }
    }

    /// Turns an allow into a rate-limited deny.
    pub fn rate_limited(mut self) -> Self {
        self.allow = false;
        self.reason = RATE_LIMITED.to_owned();
        self
    }

    /// The JSON body of the local reply.
    pub fn deny_body(&self, request_id: &str, retry_after_seconds: Option<u64>) -> String {
        let body = DenyBody {
            decision: self.outcome(),
            reason: &self.reason,
            message: message(&self.reason),
            policy_id: self.policy_id.as_deref(),
            rule_id: self.rule_id.as_deref(),
            request_id,
            retry_after_seconds,
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"decision\":\"deny\"}"))
    }
}

/// A human message per reason code.
pub fn message(reason: &str) -> &'static str {
    match reason {
        "no_certificate" => "no verified client certificate was presented",
        "unknown_agent" => "the client certificate does not belong to a registered agent",
        "agent_pending" => "the agent is pending activation",
        "agent_suspended" => "the agent is suspended",
        "agent_deactivated" => "the agent is deactivated",
        "domain_blocked" => "the domain is blocked by policy",
        "domain_allowed" => "the domain is allowed by policy",
        "rule_allowed" => "a policy rule allows this request",
        "rule_denied" => "a policy rule denies this request",
        "outside_time_window" => "the policy does not allow access at this time",
        "rate_limited" => "the agent exceeded its rate limit for this policy",
        "no_matching_policy" => "no active policy allows this domain",
        "not_configured" => "the gateway has not received its policy yet",
        "evaluation_error" => "the policy could not be evaluated",
        r if r.starts_with("custom:") => "denied by the policy's custom rule",
        _ => "denied by policy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lower_case_hyphenated_uuid_becomes_the_decision_id() {
        let envoy = "5c8fa7b3-e2de-4161-b400-35d634e279c3";
        assert_eq!(decision_id(envoy.as_bytes()), Some(envoy));
        for other in [
            "",
            "5C8FA7B3-E2DE-4161-B400-35D634E279C3",
            "5c8fa7b3e2de4161b40035d634e279c3",
            "5c8fa7b3-e2de-4161-b400-35d634e279c",
            "5c8fa7b3-e2de-4161-b400-35d634e279c3a",
            "5c8fa7b3-e2de-4161-b400_35d634e279c3",
            "5c8fa7b3-e2de-4161-b400-35d634e279g3",
            "my-own-id",
        ] {
            assert_eq!(decision_id(other.as_bytes()), None, "{other}");
        }
        assert_eq!(
            decision_id(b"5c8fa7b3-e2de-4161-b400-35d634e279\xff3"),
            None
        );
    }

    #[test]
    fn deny_body_names_reason_and_policy() {
        let decision = Decision {
            policy_id: Some("p1".into()),
            ..Decision::fixed(false, "domain_blocked")
        };
        let body: serde_json::Value =
            serde_json::from_str(&decision.deny_body("r1", None)).unwrap();
        assert_eq!(body["decision"], "deny");
        assert_eq!(body["reason"], "domain_blocked");
        assert_eq!(body["policy_id"], "p1");
        assert_eq!(body["request_id"], "r1");
        assert_eq!(body["message"], "the domain is blocked by policy");
    }
}
