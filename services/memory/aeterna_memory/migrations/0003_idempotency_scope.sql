-- Idempotency keys are scoped to the caller: (tenant, principal, method, request_id), so two
-- users of one tenant who both send request_id "note-42" never receive each other's result.
-- Keys expire (the service treats a key older than AETERNA_MEMORY_IDEMPOTENCY_TTL_S as
-- absent) and are deleted in bounded batches by gc_idempotency_keys(), which every replica
-- may call at any time: rows are locked with SKIP LOCKED, so concurrent calls share the work.

ALTER TABLE idempotency_keys ADD COLUMN principal text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (tenant_id, principal, method, request_id);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The collector runs as the schema owner (SECURITY DEFINER) and needs every tenant's expired
-- keys: a policy bound to the owner role alone admits them, and only keys older than an
-- hour. The application role gains nothing from it (unless it is also the owner, a setup
-- that never isolates tenants), and the function deletes only keys older than
-- max(max_age_s, 1 hour).
CREATE POLICY idempotency_gc ON idempotency_keys FOR ALL TO CURRENT_USER
    USING (created_at < clock_timestamp() - interval '1 hour');

CREATE FUNCTION gc_idempotency_keys(max_age_s double precision, batch integer)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    WITH doomed AS (
        SELECT ctid FROM idempotency_keys
        WHERE created_at < clock_timestamp() - make_interval(secs => greatest(max_age_s, 3600))
        ORDER BY created_at
        LIMIT least(greatest(batch, 1), 10000)
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM idempotency_keys k USING doomed WHERE k.ctid = doomed.ctid RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
REVOKE ALL ON FUNCTION gc_idempotency_keys(double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gc_idempotency_keys(double precision, integer) TO {app_role};
