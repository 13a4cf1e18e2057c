-- audit_entries partitioned on `ts` (docs/audit-chain.md, "Storage and retention").
-- Forward-only; converts the existing table and keeps its rows.
--
-- TimescaleDB usable → a hypertable with 7-day chunks, compression of chunks older than
-- 30 days and a retention policy of one year (registered but unscheduled: the control
-- plane anchors every chunk on a signed checkpoint before it drops it, see below).
-- Otherwise → native range partitioning on `ts`: weekly partitions (Monday 00:00 UTC) plus
-- a default partition; the control plane creates partitions ahead, moves rows that landed
-- in the default partition into their week, and drops partitions past retention.
--
-- The primary key of a partitioned table (and the unique indexes of a hypertable) must
-- contain the partition column, so it becomes (tenant_id, sequence_number, ts).
-- (tenant_id, sequence_number) stays unique: sequence numbers are only assigned under the
-- per-tenant chain head row lock (audit_chain_heads ... FOR UPDATE), each append takes the
-- next numbers after the head and moves the head in the same transaction, and the
-- verifier rejects any duplicate or gap (sequence_gap). The index's leading columns still
-- serve the per-tenant sequence scans (verify, export, listing cursor).

-- The retention anchor of each chain: every entry up to `sequence_number` may have been
-- dropped by retention; verification starts right after it, from the signed checkpoint
-- at that sequence (the foreign key keeps that checkpoint).
CREATE TABLE audit_retention_anchors (
    tenant_id       uuid PRIMARY KEY,
    sequence_number bigint NOT NULL,
    -- The end (exclusive) of the newest time range dropped for this chain.
    dropped_before  timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, sequence_number)
        REFERENCES audit_checkpoints (tenant_id, sequence_number)
);

DO $migration$
DECLARE
    timescale boolean := false;
    retention_job integer;
    week timestamptz;
BEGIN
    -- Guard the extension: being listed in pg_available_extensions is not enough. On a
    -- stock server CREATE EXTENSION timescaledb fails with a FATAL (not catchable) unless
    -- the library is in shared_preload_libraries. So: use it when it is installed
    -- already, or install it only when it is preloaded.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        timescale := true;
    ELSIF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
          AND coalesce(current_setting('shared_preload_libraries', true), '') ~ '(^|[\s,])timescaledb([\s,]|$)' THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            timescale := true;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is preloaded but cannot be created (%); using native partitioning', SQLERRM;
        END;
    END IF;

    ALTER TABLE audit_entries DROP CONSTRAINT audit_entries_pkey;

    IF timescale THEN
        ALTER TABLE audit_entries ADD PRIMARY KEY (tenant_id, sequence_number, ts);
        PERFORM create_hypertable('audit_entries', 'ts',
            chunk_time_interval => INTERVAL '7 days',
            migrate_data => true,
            create_default_indexes => false);
        ALTER TABLE audit_entries SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'tenant_id',
            timescaledb.compress_orderby = 'sequence_number');
        PERFORM add_compression_policy('audit_entries', INTERVAL '30 days');
        -- Registered so the table's retention is visible where operators look, but not
        -- scheduled: a chunk may only go once every chain's last entry in it is anchored
        -- on a signed checkpoint, which the control plane does right before it drops the
        -- chunk itself (audit.retention_days, default 365 like this policy).
        retention_job := add_retention_policy('audit_entries', INTERVAL '365 days');
        PERFORM alter_job(retention_job, scheduled => false);
        RETURN;
    END IF;

    -- Native partitioning: a new partitioned table, the rows copied over, the old one
    -- dropped. Index names are global, so the old table's go first.
    ALTER TABLE audit_entries RENAME TO audit_entries_unpartitioned;
    ALTER INDEX audit_entries_ts RENAME TO audit_entries_unpartitioned_ts;
    ALTER INDEX audit_entries_agent RENAME TO audit_entries_unpartitioned_agent;
    ALTER INDEX audit_entries_domain RENAME TO audit_entries_unpartitioned_domain;
    CREATE TABLE audit_entries (
        LIKE audit_entries_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
    ) PARTITION BY RANGE (ts);
    ALTER TABLE audit_entries ADD PRIMARY KEY (tenant_id, sequence_number, ts);
    CREATE INDEX audit_entries_ts ON audit_entries (tenant_id, ts);
    CREATE INDEX audit_entries_agent ON audit_entries (tenant_id, agent_id, sequence_number);
    CREATE INDEX audit_entries_domain ON audit_entries (tenant_id, domain, sequence_number);
    -- Rows whose week has no partition (a gateway clock far off, or weeks not created
    -- yet) land here instead of failing ingest; maintenance moves them out.
    CREATE TABLE audit_entries_default PARTITION OF audit_entries DEFAULT;
    -- One partition per week that holds rows, and this week; the control plane creates
    -- the weeks ahead at start-up.
    FOR week IN
        SELECT DISTINCT date_bin(INTERVAL '7 days', ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')
        FROM audit_entries_unpartitioned
        UNION
        SELECT date_bin(INTERVAL '7 days', now(), TIMESTAMPTZ '2000-01-03 00:00:00+00')
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF audit_entries FOR VALUES FROM (%L) TO (%L)',
            'audit_entries_p' || to_char(week AT TIME ZONE 'UTC', 'YYYYMMDD'),
            week, week + INTERVAL '7 days');
    END LOOP;
    INSERT INTO audit_entries SELECT * FROM audit_entries_unpartitioned;
    DROP TABLE audit_entries_unpartitioned;
END
$migration$;
