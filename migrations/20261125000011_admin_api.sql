-- Admin API: indexes for tenant-scoped cursor pagination (ordered by UUIDv7 id) and for
-- finding the agents a policy is assigned to (policy delete, listing by policy).

CREATE INDEX IF NOT EXISTS agents_tenant_id_id ON agents (tenant_id, id);
CREATE INDEX IF NOT EXISTS policies_tenant_id_id ON policies (tenant_id, id);
CREATE INDEX IF NOT EXISTS agent_policies_policy_id ON agent_policies (policy_id);
