-- Gateway fleets (docs/contracts.md §1, docs/admin-api.md): each Envoy names its fleet in
-- `node.cluster` and receives a bundle compiled from the tenants its fleet serves only.
-- Bundle versions come from the one global sequence, so each fleet's versions are
-- monotonic too, also across restarts; `gateway` is NULL on rows from before fleets.
-- Forward-only.

CREATE TABLE gateways (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    version     bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway_tenants (
    gateway   text NOT NULL REFERENCES gateways (name) ON DELETE CASCADE,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    PRIMARY KEY (gateway, tenant_id)
);

CREATE INDEX gateway_tenants_tenant ON gateway_tenants (tenant_id);

ALTER TABLE bundle_versions ADD COLUMN gateway text;

CREATE INDEX bundle_versions_gateway_version ON bundle_versions (gateway, version DESC);
