-- Sync: the state of the knowledge ⇄ memory sync (conflicts), idempotency keys and leases,
-- under forced row-level security with the three roles of governance's 0001_governance.sql
-- (ARCHITECTURE.md, "Database roles"): owner (runs this file), app ({app_role}, bound to one
-- tenant per transaction by the sealed aeterna_bind_tenant()) and indexer ({indexer_role}).
-- Live events and presence keep no rows here: they live on the Redis streams.
{tenancy}

-- Conflicts between a knowledge item and its pointer memories (the proto's ConflictKind and
-- ConflictResolution numbers); open while resolution is 0.
CREATE TABLE sync_conflicts (
    tenant_id        text        NOT NULL,
    id               uuid        NOT NULL,
    kind             smallint    NOT NULL CHECK (kind BETWEEN 1 AND 6),
    knowledge_item   text        NOT NULL DEFAULT '',
    pointer_memories text[]      NOT NULL DEFAULT '{}',
    detail           text        NOT NULL DEFAULT '' CHECK (char_length(detail) <= 2000),
    detected_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolution       smallint    NOT NULL DEFAULT 0 CHECK (resolution BETWEEN 0 AND 3),
    resolved_at      timestamptz,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX sync_conflicts_open ON sync_conflicts (tenant_id, detected_at, id)
    WHERE resolution = 0;

-- A retried write with the same request_id returns the first outcome (knowledge's shape).
CREATE TABLE idempotency_keys (
    tenant_id    text        NOT NULL,
    principal    text        NOT NULL,
    method       text        NOT NULL,
    request_id   text        NOT NULL,
    request_hash text        NOT NULL,
    response     bytea,
    position     bigint,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, principal, method, request_id)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['sync_conflicts', 'idempotency_keys'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON sync_conflicts, idempotency_keys TO {app_role};

-- Leases (aeterna_common.leases): one row per name; an expired lease is taken over with a
-- higher epoch (the fencing token). Rows are never deleted, so epochs never repeat.
CREATE TABLE leases (
    name        text        PRIMARY KEY,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL CHECK (epoch > 0),
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON leases TO {app_role};
