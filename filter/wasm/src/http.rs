//! The HTTP context: gathers request facts, asks the core for a decision, acts on it.

use crate::root::Active;
use crate::{host, vm};
use filter_core::audit::AuditRecord;
use filter_core::config::Mode;
use filter_core::decision::{DECISION_ID_HEADER, Decision};
use filter_core::input::{RequestFacts, normalize_domain, source_ip};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

pub struct Request {
    active: Option<Rc<RefCell<Active>>>,
    /// Set once the request is allowed: echoed on the response.
    decision_id: Option<String>,
}

// === impl Request ===

impl Request {
    pub fn new(active: Option<Rc<RefCell<Active>>>) -> Self {
        Self {
            active,
            decision_id: None,
        }
    }

    fn facts() -> RequestFacts {
        let header = |name: &str| host::request_header(name).unwrap_or_default();
        let path = header(":path");
        let path = path
            .split_once('?')
            .map_or(path.as_str(), |(p, _)| p)
            .to_owned();
        RequestFacts {
            fingerprint: host::property(&["connection", "sha256_peer_certificate_digest"])
                .unwrap_or_default()
                .to_ascii_lowercase(),
            subject: host::property(&["connection", "subject_peer_certificate"])
                .unwrap_or_default(),
            domain: normalize_domain(&header(":authority")),
            method: header(":method"),
            path,
            user_agent: header("user-agent"),
            source_ip: source_ip(&host::property(&["source", "address"]).unwrap_or_default()),
            scheme: header(":scheme"),
            unix_ns: host::now_ns(),
        }
    }

    /// The decision under the active configuration; never fails.
    fn decide(
        &self,
        facts: &RequestFacts,
        metrics: &crate::metrics::Metrics,
    ) -> (Decision, Rc<str>) {
        let Some(active) = &self.active else {
            host::increment(metrics.not_configured, 1);
            return (Decision::fixed(false, "not_configured"), Rc::from("none"));
        };
        let mut active = active.borrow_mut();
        let version = active.version.clone();
        let decision = match (active.mode, active.policy.as_mut()) {
            (Mode::Enforce, Some(policy)) => match policy.evaluate(facts) {
                Ok(decision) => decision,
                Err(err) => {
                    host::increment(metrics.evaluation_errors, 1);
                    host::log(LogLevel::Error, &format!("evaluation error: {err}"));
                    Decision::fixed(false, "evaluation_error")
                }
            },
            (Mode::AllowAll, _) => {
                host::increment(metrics.not_configured, 1);
                Decision::fixed(true, "not_configured")
            }
            _ => {
                host::increment(metrics.not_configured, 1);
                Decision::fixed(false, "not_configured")
            }
        };
        (decision, version)
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let facts = Self::facts();
        let state = vm::state();
        let mut state = state.borrow_mut();
        let (decision, version) = self.decide(&facts, &state.metrics);
        let id = state.ids.next_id();
        host::increment(
            if decision.allow {
                state.metrics.allow
            } else {
                state.metrics.deny
            },
            1,
        );
        state.record(AuditRecord::new(id.clone(), &facts, &decision, &version));
        drop(state);
        if decision.allow {
            host::set_request_header(DECISION_ID_HEADER, &id);
            self.decision_id = Some(id);
            Action::Continue
        } else {
            let body = decision.deny_body(&id);
            host::send_response(
                decision.status(),
                vec![
                    ("content-type", "application/json"),
                    (DECISION_ID_HEADER, &id),
                ],
                body.as_bytes(),
            );
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(id) = &self.decision_id {
            host::set_response_header(DECISION_ID_HEADER, id);
        }
        Action::Continue
    }
}
