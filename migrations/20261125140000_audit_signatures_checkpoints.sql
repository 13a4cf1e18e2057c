-- Audit chain signatures and signed checkpoints (docs/audit-chain.md). Forward-only.

-- HMAC-SHA256 of each entry's current hash with the key named by signature_key_id; both
-- null for entries stored without HMAC keys configured.
ALTER TABLE audit_entries
    ADD COLUMN signature_key_id text,
    ADD COLUMN signature        text,
    ADD CONSTRAINT audit_entries_signature_pair
        CHECK ((signature_key_id IS NULL) = (signature IS NULL));

-- Ed25519-signed chain heads. One per (tenant, sequence): two replicas checkpointing the
-- same head store it once.
CREATE TABLE audit_checkpoints (
    tenant_id       uuid NOT NULL,
    sequence_number bigint NOT NULL CHECK (sequence_number > 0),
    head_hash       text NOT NULL,
    created_at_ns   bigint NOT NULL,
    key_id          text NOT NULL,
    signature       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, sequence_number)
);

-- Auditor filters on the entries listing.
CREATE INDEX audit_entries_agent ON audit_entries (tenant_id, agent_id, sequence_number);
CREATE INDEX audit_entries_domain ON audit_entries (tenant_id, domain, sequence_number);
