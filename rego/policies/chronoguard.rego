# ChronoGuard decision library: data-driven, evaluated by regorus inside Envoy.
#
# Entry point: data.chronoguard.decision (an object, see rego/README.md).
# Data (the policy bundle's data document) is indexed by the control plane's compiler:
#   data.agents[<sha256 fingerprint>]  -> {id, tenant_id, name, status, policies: [policy id]}
#   data.policies[<policy id>]         -> {id, tenant_id, priority, status, mode,
#                                          allowed_domains, blocked_domains}
# Input is built by the filter (see filter/core/src/input.rs); the domain arrives
# normalised (lower case, no port, no trailing dot).
package chronoguard

import rego.v1

agent := data.agents[input.agent.fingerprint]

# Active policies attached to the agent.
active_policies contains p if {
	some pid in agent.policies
	p := data.policies[pid]
	p.status == "active"
}

# A pattern matches the domain exactly, or as "*.suffix" for strict subdomains.
domain_matches(domain, pattern) if pattern == domain

domain_matches(domain, pattern) if {
	startswith(pattern, "*.")
	endswith(domain, substring(pattern, 1, -1))
}

listed(domain, patterns) if {
	some pattern in patterns
	domain_matches(domain, pattern)
}

# The verdict of one policy on this request, or undefined when the policy does not decide.
# Blocked beats allowed within a policy.
verdict(p) := {"allow": false, "reason": "domain_blocked", "policy_id": p.id, "priority": p.priority} if {
	listed(input.request.domain, p.blocked_domains)
} else := {"allow": true, "reason": "domain_allowed", "policy_id": p.id, "priority": p.priority} if {
	listed(input.request.domain, p.allowed_domains)
}

verdicts contains v if {
	some p in active_policies
	v := verdict(p)
}

# The highest priority among decisive policies wins; on a tie a deny wins.
top_priority := max({v.priority | some v in verdicts})

top := {v | some v in verdicts; v.priority == top_priority}

top_denies := {v | some v in top; v.allow == false}

# Ties are broken deterministically (Rego's total order over the verdict objects).
winning := min(top_denies) if {
	count(top_denies) > 0
} else := min(top) if {
	count(top) > 0
}

identity := {"tenant_id": agent.tenant_id, "agent_id": agent.id}

default identity := {"tenant_id": null, "agent_id": null}

decision := deny("no_certificate", null) if {
	input.agent.fingerprint == ""
} else := deny("unknown_agent", null) if {
	not agent
} else := deny(concat("", ["agent_", agent.status]), null) if {
	agent.status != "active"
} else := object.union(identity, {"allow": winning.allow, "reason": winning.reason, "policy_id": winning.policy_id}) if {
	winning
} else := deny("no_matching_policy", null)

deny(reason, policy_id) := object.union(identity, {"allow": false, "reason": reason, "policy_id": policy_id})
