-- ChronoGuard schema: tenants, agents, policies, bundle versions, audit chain.
-- Forward-only. Works on plain PostgreSQL 15+; TimescaleDB specifics arrive in later
-- migrations guarded by the extension's presence.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    name            text NOT NULL,
    fingerprint     text NOT NULL UNIQUE,
    subject         text NOT NULL,
    sans            text[] NOT NULL DEFAULT '{}',
    not_before      timestamptz NOT NULL,
    not_after       timestamptz NOT NULL,
    certificate_pem text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'deactivated')),
    version         bigint NOT NULL DEFAULT 1,
    last_seen_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE policies (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    name            text NOT NULL,
    priority        integer NOT NULL,
    status          text NOT NULL CHECK (status IN ('draft', 'active', 'archived')),
    mode            text NOT NULL CHECK (mode IN ('enforce', 'dry_run')),
    allowed_domains text[] NOT NULL DEFAULT '{}',
    blocked_domains text[] NOT NULL DEFAULT '{}',
    version         bigint NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE agent_policies (
    agent_id  uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    policy_id uuid NOT NULL REFERENCES policies (id) ON DELETE CASCADE,
    PRIMARY KEY (agent_id, policy_id)
);

-- Every distinct bundle the control plane published; versions never go backwards, also
-- across restarts (the latest row is the version served after a restart).
CREATE TABLE bundle_versions (
    version      bigserial PRIMARY KEY,
    content_hash text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Batch ids already stored: a retried batch is acknowledged without storing it again.
CREATE TABLE audit_batches (
    batch_id    uuid PRIMARY KEY,
    entry_count integer NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The head of each tenant's chain; its row lock serialises appends per tenant, also
-- across control-plane replicas.
CREATE TABLE audit_chain_heads (
    tenant_id       uuid PRIMARY KEY,
    sequence_number bigint NOT NULL,
    current_hash    text NOT NULL
);

-- Chained entries. tenant_id is not a foreign key: decisions about unknown certificates
-- belong to the gateway chain (the nil UUID). See docs/audit-chain.md.
CREATE TABLE audit_entries (
    tenant_id         uuid NOT NULL,
    sequence_number   bigint NOT NULL,
    entry_id          uuid NOT NULL,
    timestamp_ns      bigint NOT NULL,
    ts                timestamptz NOT NULL,
    kind              text NOT NULL,
    agent_id          uuid,
    agent_fingerprint text NOT NULL,
    agent_subject     text NOT NULL,
    domain            text NOT NULL,
    method            text NOT NULL,
    path              text NOT NULL,
    user_agent        text NOT NULL,
    source_ip         text NOT NULL,
    decision          text NOT NULL,
    reason            text NOT NULL,
    policy_id         text,
    config_version    text NOT NULL,
    previous_hash     text NOT NULL,
    current_hash      text NOT NULL,
    PRIMARY KEY (tenant_id, sequence_number)
);

CREATE INDEX audit_entries_ts ON audit_entries (tenant_id, ts);
