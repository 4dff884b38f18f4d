-- The audit log: per tenant, a hash chain of every event of every service, append-only, and
-- checkpoints of each chain's head (so that truncation is detected too).
--
-- Entries: sequence 1, 2, ... without gaps per tenant; event_id ({service}:{position}) at
-- most once per tenant; hash = SHA-256 over the entry's RFC 8785 canonical JSON, which
-- includes previous_hash (64 zeros for the first entry); see aeterna_governance.audit.chain.
-- The application role may only INSERT and SELECT its tenant's rows (forced RLS); checkpoints
-- it may only read. Besides the grants, a trigger refuses UPDATE, DELETE and TRUNCATE of
-- either table to every role but the tables' owner (and superusers, who could drop the
-- trigger anyway), so a later GRANT cannot open them by mistake.
CREATE TABLE audit_entries (
    tenant_id     text        NOT NULL,
    sequence      bigint      NOT NULL CHECK (sequence > 0),
    event_id      text        NOT NULL CHECK (char_length(event_id) BETWEEN 1 AND 200),
    event_type    text        NOT NULL,
    service       text        NOT NULL,
    resource      text        NOT NULL,
    actor         text        NOT NULL,
    event_time    timestamptz NOT NULL,
    append_time   timestamptz NOT NULL,
    -- The event's payload as RFC 8785 canonical JSON text (a fixpoint of canonicalisation:
    -- jsonb would rewrite numbers, e.g. 1e+300 as 301 digits, and change the hash).
    payload       text        NOT NULL CHECK (jsonb_typeof(payload::jsonb) = 'object'),
    previous_hash text        NOT NULL CHECK (previous_hash ~ '^[0-9a-f]{64}$'),
    hash          text        NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    PRIMARY KEY (tenant_id, sequence),
    UNIQUE (tenant_id, event_id)
);
CREATE INDEX audit_entries_resource ON audit_entries (tenant_id, resource, sequence);
CREATE INDEX audit_entries_actor ON audit_entries (tenant_id, actor, sequence);

-- The head of a tenant's chain as the checkpoint job saw it.
CREATE TABLE audit_checkpoints (
    tenant_id  text        NOT NULL,
    sequence   bigint      NOT NULL CHECK (sequence > 0),
    hash       text        NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, sequence)
);

CREATE FUNCTION aeterna_private.audit_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- current_user, not session_user: the role whose privileges run the statement. This
    -- function is not SECURITY DEFINER, so that is the caller.
    IF current_user <> (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = TG_RELID)
        AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
            USING ERRCODE = '42501';
    END IF;
    RETURN NULL;  -- BEFORE ... FOR EACH STATEMENT: the return value is ignored
END
$$;
REVOKE ALL ON FUNCTION aeterna_private.audit_append_only() FROM PUBLIC;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['audit_entries', 'audit_checkpoints'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
        EXECUTE format(
            'CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON %I '
            'FOR EACH STATEMENT EXECUTE FUNCTION aeterna_private.audit_append_only()', t);
        EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT ON audit_entries TO {app_role};
GRANT SELECT ON audit_checkpoints TO {app_role};

-- The checkpoint job (a leased periodic job of the application role) calls this function,
-- which runs as the owner: it finds each tenant's head with a skip scan of the primary key
-- (one index probe per tenant) and records it when the chain grew since the last checkpoint.
-- The owner reads entries and writes checkpoints through policies bound to it alone.
CREATE POLICY checkpoint_job ON audit_entries FOR SELECT TO CURRENT_USER USING (true);
CREATE POLICY checkpoint_job ON audit_checkpoints FOR ALL TO CURRENT_USER
    USING (true) WITH CHECK (true);

CREATE FUNCTION audit_checkpoint_heads() RETURNS integer
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    WITH RECURSIVE tenants(tenant_id) AS (
        (SELECT tenant_id FROM audit_entries ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT e.tenant_id FROM audit_entries e WHERE e.tenant_id > t.tenant_id
                ORDER BY e.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), heads AS (
        SELECT h.tenant_id, h.sequence, h.hash
        FROM tenants t
        CROSS JOIN LATERAL (
            SELECT e.tenant_id, e.sequence, e.hash FROM audit_entries e
            WHERE e.tenant_id = t.tenant_id ORDER BY e.sequence DESC LIMIT 1
        ) h
    ), added AS (
        INSERT INTO audit_checkpoints (tenant_id, sequence, hash)
        SELECT tenant_id, sequence, hash FROM heads
        ON CONFLICT (tenant_id, sequence) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer FROM added
$$;
REVOKE ALL ON FUNCTION audit_checkpoint_heads() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_checkpoint_heads() TO {app_role};
