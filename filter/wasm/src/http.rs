//! The HTTP context: gathers request facts, asks the core for a decision, enforces the
//! rate limit, audits, and answers.

use crate::host::RequestHeaders;
use crate::metrics::Metrics;
use crate::ratelimit::{self, Check};
use crate::root::Active;
use crate::vm::Peer;
use crate::{host, vm};
use filter_core::audit::AuditRecord;
use filter_core::config::Mode;
use filter_core::decision::{Decision, REQUEST_ID_HEADER, decision_id};
use filter_core::input::{RequestFacts, normalize_domain};
use proxy_wasm::types::{Action, LogLevel};
use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// Where a benchmark build stops the request path (`cargo xtask bench` prices each stage
/// against plain Envoy, BENCHMARKS.md); set at compile time through
/// `CHRONOGUARD_FILTER_STAGE`. A normal build has none and runs everything.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The filter is there and lets every request through untouched.
    Noop,
    /// + reads the request facts.
    Facts,
    /// + decides (memoised Rego decision).
    Decide,
    /// + the rate limit (shared-data token bucket).
    Limit,
    /// + the audit record.
    Audit,
    /// + the filter's own request id where Envoy wrote none; denials still go through.
    Header,
    /// + the local replies for denials: the whole filter.
    Full,
}

// An unknown stage name fails the build (this runs at compile time), so a benchmark
// never measures a mislabelled module.
#[allow(clippy::panic)]
const STAGE: Stage = match option_env!("CHRONOGUARD_FILTER_STAGE") {
    None => Stage::Full,
    Some(stage) => match stage.as_bytes() {
        b"noop" => Stage::Noop,
        b"facts" => Stage::Facts,
        b"decide" => Stage::Decide,
        b"limit" => Stage::Limit,
        b"audit" => Stage::Audit,
        b"header" => Stage::Header,
        b"full" => Stage::Full,
        _ => panic!("CHRONOGUARD_FILTER_STAGE: noop, facts, decide, limit, audit, header or full"),
    },
};

/// Decides one request from its headers under `active` (the VM's latest configuration),
/// and acts: lets it through with the decision id, or answers it.
pub fn on_request_headers(active: Option<Rc<RefCell<Active>>>) -> Action {
    Request { active }.on_request_headers()
}

struct Request {
    active: Option<Rc<RefCell<Active>>>,
}

// === impl Request ===

impl Request {
    /// The request's facts, borrowed from its header map and its connection's peer where
    /// they need no change, with Envoy's clock.
    fn facts<'a>(headers: RequestHeaders<'a>, peer: &'a Peer) -> RequestFacts<'a> {
        let RequestHeaders {
            authority,
            method,
            path,
            user_agent,
            request_id: _,
            peer: _,
        } = headers;
        // Query strings are never evaluated or audited (they carry secrets).
        let path = match path {
            Cow::Borrowed(path) => Cow::Borrowed(path.split('?').next().unwrap_or_default()),
            Cow::Owned(mut path) => {
                if let Some(at) = path.find('?') {
                    path.truncate(at);
                }
                Cow::Owned(path)
            }
        };
        let method = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(method.to_ascii_uppercase())
        } else {
            method
        };
        let domain = match authority {
            Cow::Borrowed(authority) => normalize_domain(authority),
            Cow::Owned(authority) => Cow::Owned(normalize_domain(&authority).into_owned()),
        };
        RequestFacts {
            fingerprint: Cow::Borrowed(&peer.fingerprint),
            subject: Cow::Borrowed(&peer.subject),
            domain,
            method,
            path,
            user_agent,
            source_ip: Cow::Borrowed(&peer.source_ip),
            // The gateway listener is TLS-only (mTLS identity); not read per request.
            scheme: Cow::Borrowed("https"),
            unix_ns: host::now_ns(),
        }
    }

    /// The decision under the active configuration; never fails.
    fn decide(&self, facts: &RequestFacts<'_>, metrics: &mut Metrics) -> (Arc<Decision>, Rc<str>) {
        let Some(active) = &self.active else {
            metrics.add(metrics.not_configured, 1);
            return (
                Arc::new(Decision::fixed(false, "not_configured")),
                Rc::from("none"),
            );
        };
        let mut active = active.borrow_mut();
        let version = active.version.clone();
        let decision = match (active.mode, active.policy.as_mut()) {
            (Mode::Enforce, Some(policy)) => match policy.evaluate_memo(facts) {
                Ok((decision, hit)) => {
                    if hit {
                        metrics.add(metrics.memo_hits, 1);
                    } else {
                        let micros = host::now_ns().saturating_sub(facts.unix_ns) / 1_000;
                        host::record(metrics.evaluation_us, micros);
                    }
                    decision
                }
                Err(err) => {
                    metrics.add(metrics.evaluation_errors, 1);
                    host::log(LogLevel::Error, &format!("evaluation error: {err}"));
                    Arc::new(Decision::fixed(false, "evaluation_error"))
                }
            },
            (Mode::AllowAll, _) => {
                metrics.add(metrics.not_configured, 1);
                Arc::new(Decision::fixed(true, "not_configured"))
            }
            _ => {
                metrics.add(metrics.not_configured, 1);
                Arc::new(Decision::fixed(false, "not_configured"))
            }
        };
        (decision, version)
    }

    /// Applies the deciding policy's rate limit to an allowed request.
    fn limit(
        decision: Arc<Decision>,
        facts: &RequestFacts<'_>,
        metrics: &mut Metrics,
    ) -> (Arc<Decision>, Option<u64>) {
        let (Some(limit), Some(agent), Some(policy)) = (
            decision.rate_limit.filter(|_| decision.allow),
            decision.agent_id.as_deref(),
            decision.policy_id.as_deref(),
        ) else {
            return (decision, None);
        };
        match ratelimit::check(agent, policy, &limit, facts.unix_ns) {
            Check::Allowed => (decision, None),
            Check::Limited(retry_after) => (
                Arc::new(Arc::unwrap_or_clone(decision).rate_limited()),
                Some(retry_after),
            ),
            Check::StoreError => {
                metrics.add(metrics.rate_limit_errors, 1);
                host::log(
                    LogLevel::Warn,
                    "rate limit store unavailable; request allowed",
                );
                (decision, None)
            }
        }
    }

    /// Decides the request and acts: lets it through with the decision id, or answers it.
    fn on_request_headers(&self) -> Action {
        if STAGE == Stage::Noop {
            return Action::Continue;
        }
        let state = vm::state();
        let mut state = state.borrow_mut();
        // All request headers in one host call; the peer from the connection the
        // listener's `x-chronoguard-peer` names (no host call) or from Envoy's properties.
        let header_map = host::request_header_map();
        let headers = header_map.request_headers();
        let lookup = state.peers.peer(headers.peer);
        let metrics = &mut state.metrics;
        if lookup.read {
            metrics.add(metrics.peer_reads, 1);
        }
        if lookup.header_ignored {
            metrics.add(metrics.peer_header_ignored, 1);
        }
        let peer = lookup.peer;
        // The decision id is Envoy's request id, which the route copies onto the request
        // and the response as `x-chronoguard-decision-id` (`envoy-config/`): no header
        // change here, so Envoy keeps its route cache.
        let envoy_id = decision_id(headers.request_id);
        let facts = Self::facts(headers, &peer);
        if STAGE == Stage::Facts {
            return Action::Continue;
        }
        let (decision, version) = self.decide(&facts, &mut state.metrics);
        if STAGE == Stage::Decide {
            state.count_decision(&decision);
            return Action::Continue;
        }
        let (decision, retry_after) = Self::limit(decision, &facts, &mut state.metrics);
        let id = match envoy_id {
            Some(id) => Cow::Borrowed(id),
            None => Cow::Owned(state.ids.next_id()),
        };
        state.count_decision(&decision);
        if STAGE == Stage::Limit {
            return Action::Continue;
        }
        let mut record = AuditRecord::of(&id, &facts, &decision, &version);
        let dry_run_reason;
        if let Some(dry_run) = decision
            .dry_run
            .as_ref()
            .filter(|d| !d.allow && decision.allow)
        {
            // The request went through; the record says which dry-run policy would have
            // blocked it and why.
            dry_run_reason = format!("dry_run_deny:{}", dry_run.reason);
            record.reason = &dry_run_reason;
            record.policy_id = dry_run.policy_id.as_deref();
        }
        state.record(&record);
        drop(state);
        if STAGE == Stage::Audit {
            return Action::Continue;
        }
        if envoy_id.is_none() {
            // No request id Envoy wrote (`generate_request_id: false`, or a client's own
            // id that is no UUID and that Envoy kept): the filter's id takes its place, for
            // the route to copy.
            host::set_request_header(REQUEST_ID_HEADER, &id);
        }
        if decision.allow || STAGE == Stage::Header {
            Action::Continue
        } else {
            let body = decision.deny_body(&id, retry_after);
            let retry = retry_after.map(|s| s.to_string());
            // The route puts `x-chronoguard-decision-id` on local replies too, before the
            // headers given here (`envoy-config/`): one more here would be a second copy.
            let mut headers = vec![("content-type", "application/json")];
            if let Some(retry) = &retry {
                headers.push(("retry-after", retry.as_str()));
            }
            host::send_response(decision.status(), headers, body.as_bytes());
            Action::Pause
        }
    }
}
