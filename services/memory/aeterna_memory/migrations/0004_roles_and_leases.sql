-- Three database roles, tenant binding that no setting can change, and leases.
--
-- owner (runs this file): owns every table, function and schema. No serving
--   process connects as it. Tables keep FORCE ROW LEVEL SECURITY, and no policy names the
--   owner, so even the owner reads no tenant rows through the tables' policies.
-- app ({app_role}): serves requests. Its tenant_isolation policies are bound TO it and to
--   the tenant bound to the current transaction by aeterna_bind_tenant(), which records the
--   binding in a transaction-local setting sealed with a keyed hash (a key only the owner
--   can read) over the tenant, the backend pid and the transaction's start time, and takes
--   a transaction-level advisory lock so that a transaction is bound at most once. Setting,
--   resetting or forging any setting therefore makes aeterna_tenant() NULL (no rows), never
--   another tenant.
-- indexer ({indexer_role}): SELECT on memories and outbox of every tenant, nothing else; used
--   only by index followers and the reconciler.
--
-- The old policies admitted every tenant to any session that set app.all_tenants, and any
-- tenant to a session that set app.tenant_id: both are dropped.

{tenancy}

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['memories', 'memory_revisions', 'idempotency_keys', 'outbox'] LOOP
        EXECUTE format('DROP POLICY tenant_isolation ON %I', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

DROP POLICY index_maintenance ON memories;
DROP POLICY index_maintenance ON outbox;
CREATE POLICY index_maintenance ON memories FOR SELECT TO {indexer_role} USING (true);
CREATE POLICY index_maintenance ON outbox FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT ON memories, outbox TO {indexer_role};

-- Leases: one row per name. The holder renews before expires_at; anyone may take an expired
-- lease over, which increments epoch (the fencing token). Rows are never deleted, so epochs
-- never repeat. Times are PostgreSQL's now().
CREATE TABLE leases (
    name        text        PRIMARY KEY,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL CHECK (epoch > 0),
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON leases TO {app_role};

-- The epoch of the lease holder that last wrote each shared index's cursor: a write with a
-- smaller epoch is refused.
ALTER TABLE index_cursors ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
