-- Full policy semantics (rego/README.md): rule conditions, time windows with an IANA
-- timezone, rate limits, optional custom Rego; agent metadata for rule conditions.
-- Forward-only.

ALTER TABLE policies
    ADD COLUMN rules            jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN time_restrictions jsonb,
    ADD COLUMN rate_limit       jsonb,
    ADD COLUMN custom_rego      text;

ALTER TABLE agents
    ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
