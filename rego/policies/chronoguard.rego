# ChronoGuard decision library: data-driven, evaluated by regorus inside Envoy.
#
# Entry point: data.chronoguard.decision (an object, see rego/README.md for the semantics).
# Data (the policy bundle's data document) is indexed by the control plane's compiler:
#   agents[<sha256 fingerprint>] -> {id, tenant_id, name, status, metadata, policies}
#   policies[<policy id>]        -> {id, tenant_id, priority, status, mode, timezone,
#                                    windows, rules, rate_limit, custom,
#                                    allowed_exact, allowed_suffix,
#                                    blocked_exact, blocked_suffix}
#   (the domain sets are objects keyed by name: exact names, and the suffixes of
#   "*.suffix" wildcards without "*.", so a decision looks domains up, never scans lists)
# The filter core looks the request's agent and its policies up in it and passes them in
# the input: input.bundle.agent (absent for an unknown fingerprint) and
# input.bundle.policies[<policy id>]. The engine's own data document stays empty, so a
# push that changes only agents or policies leaves the compiled modules untouched.
# Input is built by the filter core (filter/core/src/input.rs): the domain arrives
# normalised (lower case, no port, no trailing dot), the method upper-cased, and
# input.time.local[<timezone>] holds the local day and minute for every timezone the
# bundle uses (computed from Envoy's clock with the bundle's offset tables).
# Written for regorus's interpreter, where a function call costs about three rule
# lookups and each further definition of a function half a call more: helpers on the
# hot path are single definitions with `else` chains, and a policy's verdict spells its
# lookups out instead of calling helpers (BENCHMARKS.md, "Fourteenth session": a memo
# miss costs 29% fewer instructions than with one definition per case).
package chronoguard

import rego.v1

agent := input.bundle.agent

# Active policies attached to the agent.
active_policies contains p if {
	some pid in agent.policies
	p := input.bundle.policies[pid]
	p.status == "active"
}

enforced_policies contains p if {
	some p in active_policies
	p.mode != "dry_run"
}

# === Domains ===

# The request domain's strict parent suffixes: a.b.example.com -> b.example.com,
# example.com, com. A "*.suffix" wildcard matches exactly when its suffix is one of them.
# Computed once per evaluation; its size is the domain's depth, not any list's length.
domain_suffixes contains concat(".", array.slice(labels, i, count(labels))) if {
	labels := split(input.request.domain, ".")
	some i, _ in labels
	i > 0
}

# === Time windows ===

local_time(p) := input.time.local[p.timezone]

# A policy without windows is always in its window.
in_window(p) if {
	count(p.windows) == 0
} else if {
	t := input.time.local[p.timezone]
	some w in p.windows
	window_matches(w, t)
}

# [start, end) in minutes of the local day; start > end crosses midnight, and the part
# after midnight belongs to the day the window started.
window_matches(w, t) if {
	w.start < w.end
	t.day in w.days
	t.minute >= w.start
	t.minute < w.end
} else if {
	w.start > w.end
	t.day in w.days
	t.minute >= w.start
} else if {
	w.start > w.end
	t.prev_day in w.days
	t.minute < w.end
}

# === Rule conditions ===

field_value(p, field) := input.request.domain if {
	field == "domain"
} else := input.request.method if {
	field == "method"
} else := input.request.path if {
	field == "path"
} else := input.request.user_agent if {
	field == "user_agent"
} else := input.request.source_ip if {
	field == "source_ip"
} else := local_time(p).hour if {
	field == "hour"
} else := local_time(p).minute_of_hour if {
	field == "minute"
} else := local_time(p).day if {
	field == "day_of_week"
} else := agent.name if {
	field == "agent_name"
} else := agent.metadata[substring(field, 15, -1)] if {
	startswith(field, "agent_metadata.")
}

member(value, values) if value in values

holds(operator, value, expected) if {
	operator == "equals"
	value == expected
} else if {
	operator == "not_equals"
	value != expected
} else if {
	operator == "in"
	member(value, expected)
} else if {
	operator == "not_in"
	not member(value, expected)
} else if {
	operator == "contains"
	contains(value, expected)
} else if {
	operator == "starts_with"
	startswith(value, expected)
} else if {
	operator == "ends_with"
	endswith(value, expected)
} else if {
	operator == "matches"
	regex.match(expected, value)
} else if {
	operator == "cidr"
	net.cidr_contains(expected, value)
}

# Rules arrive sorted by priority (highest first), then id: the first matching one counts.
# A rule matches when all its conditions hold (a rule without conditions always matches).
first_rule(p) := p.rules[min(matching)] if {
	matching := [i |
		some i, rule in p.rules
		every c in rule.conditions {
			holds(c.operator, field_value(p, c.field), c.value)
		}
	]
	count(matching) > 0
}

# === Custom Rego ===

# A policy's custom module (package chronoguard.custom.<key>) adds deny reasons through
# its `deny` set.
custom_deny(p) := concat("", ["custom:", min(reasons)]) if {
	p.custom != null
	reasons := data.chronoguard.custom[p.custom].deny
	count(reasons) > 0
}

# === One policy's verdict ===

verdict_of(p, allow, reason, rule_id) := {
	"allow": allow,
	"reason": reason,
	"policy_id": p.id,
	"priority": p.priority,
	"rule_id": rule_id,
	"rate_limit": p.rate_limit,
}

# An allow only holds inside the policy's time windows.
allow_verdict(p, reason, rule_id) := verdict_of(p, true, reason, rule_id) if {
	in_window(p)
} else := verdict_of(p, false, "outside_time_window", rule_id)

rule_verdict(p, rule) := verdict_of(p, false, "rule_denied", rule.id) if {
	rule.action == "deny"
} else := allow_verdict(p, "rule_allowed", rule.id)

# Undefined when the policy does not decide this request. A domain is listed by exact
# name, or by a wildcard's suffix (`domain_suffixes`). These lookups are the only reads of
# the domain sets: the filter keeps a memoised decision across a push that changed no
# lookup of its domain (Entries::domain_signature in filter/core/src/data.rs).
verdict(p) := verdict_of(p, false, "domain_blocked", null) if {
	p.blocked_exact[input.request.domain]
} else := verdict_of(p, false, "domain_blocked", null) if {
	some parent in domain_suffixes
	p.blocked_suffix[parent]
} else := verdict_of(p, false, reason, null) if {
	p.custom != null
	reason := custom_deny(p)
} else := rule_verdict(p, rule) if {
	count(p.rules) > 0
	rule := first_rule(p)
} else := allow_verdict(p, "domain_allowed", null) if {
	p.allowed_exact[input.request.domain]
} else := allow_verdict(p, "domain_allowed", null) if {
	some parent in domain_suffixes
	p.allowed_suffix[parent]
}

# === Combining policies ===

# The highest priority wins; at equal priority a deny wins (false orders before true);
# ties are broken by Rego's total order over the verdicts so the result is deterministic.
# Priorities are only compared with each other, here, and left out of the outcome: the
# filter keeps a memoised decision across a push that changed priorities but not their
# order among the agent's policies (Entries::domain_signature).
best(verdicts) := min({[v.allow, v] | some v in verdicts; v.priority == top})[1] if {
	top := max({v.priority | some v in verdicts})
}

enforced_verdicts contains v if {
	some p in enforced_policies
	v := verdict(p)
}

# What would happen if the dry-run policies were enforced too.
all_verdicts contains v if {
	some p in active_policies
	v := verdict(p)
}

identity := {"tenant_id": agent.tenant_id, "agent_id": agent.id}

default identity := {"tenant_id": null, "agent_id": null}

outcome(v) := {
	"allow": v.allow,
	"reason": v.reason,
	"policy_id": v.policy_id,
	"rule_id": v.rule_id,
	"rate_limit": v.rate_limit,
}

no_verdict := {"allow": false, "reason": "no_matching_policy", "policy_id": null, "rule_id": null, "rate_limit": null}

enforced_outcome := outcome(best(enforced_verdicts)) if {
	count(enforced_verdicts) > 0
} else := no_verdict

would_outcome := outcome(best(all_verdicts)) if {
	count(all_verdicts) > 0
} else := no_verdict

# Present only when dry-run policies would change the decision.
dry_run := {"dry_run": {
	"allow": would_outcome.allow,
	"reason": would_outcome.reason,
	"policy_id": would_outcome.policy_id,
	"rule_id": would_outcome.rule_id,
}} if {
	count(active_policies) != count(enforced_policies)
	would_outcome.allow != enforced_outcome.allow
} else := {}

decision := deny("no_certificate") if {
	input.agent.fingerprint == ""
} else := deny("unknown_agent") if {
	not agent
} else := deny(concat("", ["agent_", agent.status])) if {
	agent.status != "active"
} else := object.union(object.union(identity, enforced_outcome), dry_run)

deny(reason) := object.union(identity, {"allow": false, "reason": reason, "policy_id": null, "rule_id": null, "rate_limit": null})
