-- Knowledge: items, their revisions and relations, idempotency keys, the outbox and leases,
-- under forced row-level security with the three roles of governance's 0001_governance.sql
-- (ARCHITECTURE.md, "Database roles"): owner (runs this file), app ({app_role}, bound to one
-- tenant per transaction by the sealed aeterna_bind_tenant()) and indexer ({indexer_role},
-- SELECT of the outbox for the relay).
{tenancy}

-- Items. layer: PROJECT 1 < TEAM 2 < ORG 3 < COMPANY 4 (the proto's KnowledgeLayer); type,
-- status, severity and variant_role are the proto's enum numbers. version is the etag
-- (AIP-154) and the number of the last revision. A path is unique per (layer, unit) among
-- live items (not SUPERSEDED, DEPRECATED or REJECTED), so a successor may reuse it.
CREATE TABLE knowledge_items (
    tenant_id     text        NOT NULL,
    id            uuid        NOT NULL,
    type          smallint    NOT NULL CHECK (type BETWEEN 1 AND 5),
    layer         smallint    NOT NULL CHECK (layer BETWEEN 1 AND 4),
    org_unit_id   text        NOT NULL CHECK (org_unit_id ~ '^[a-z0-9-]{1,63}$'),
    path          text        NOT NULL CHECK (char_length(path) BETWEEN 1 AND 200),
    title         text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 300),
    summary       text        NOT NULL DEFAULT '',
    content       text        NOT NULL DEFAULT '' CHECK (octet_length(content) <= 262144),
    content_hash  text        NOT NULL,
    severity      smallint    NOT NULL CHECK (severity BETWEEN 1 AND 3),
    status        smallint    NOT NULL CHECK (status BETWEEN 1 AND 6),
    tags          text[]      NOT NULL DEFAULT '{}',
    constraints   text[]      NOT NULL DEFAULT '{}',
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version       bigint      NOT NULL DEFAULT 1,
    author        text        NOT NULL,
    variant_role  smallint    NOT NULL CHECK (variant_role BETWEEN 1 AND 6),
    promoted_from uuid,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX knowledge_items_live_path ON knowledge_items (tenant_id, layer, org_unit_id, path)
    WHERE status IN (1, 2, 3);
CREATE INDEX knowledge_items_list ON knowledge_items (tenant_id, path, layer, id);

-- Every change of an item: its version, content, hash, author and reason (append-only).
CREATE TABLE knowledge_revisions (
    tenant_id    text        NOT NULL,
    item_id      uuid        NOT NULL,
    version      bigint      NOT NULL,
    content      text        NOT NULL,
    content_hash text        NOT NULL,
    author       text        NOT NULL,
    reason       text        NOT NULL CHECK (char_length(reason) <= 500),
    status       smallint    NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, item_id, version),
    FOREIGN KEY (tenant_id, item_id) REFERENCES knowledge_items (tenant_id, id) ON DELETE CASCADE
);

-- Directed relations (the proto's RelationKind); each row has its inverse row on the target,
-- written in the same transaction. Both ends are in the same tenant (the foreign keys
-- include the tenant) and differ.
CREATE TABLE knowledge_relations (
    tenant_id  text        NOT NULL,
    id         uuid        NOT NULL,
    source_id  uuid        NOT NULL,
    target_id  uuid        NOT NULL,
    kind       smallint    NOT NULL CHECK (kind BETWEEN 1 AND 9),
    author     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, source_id, kind, target_id),
    CHECK (source_id <> target_id),
    FOREIGN KEY (tenant_id, source_id) REFERENCES knowledge_items (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, target_id) REFERENCES knowledge_items (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX knowledge_relations_target ON knowledge_relations (tenant_id, target_id);

-- A retried write with the same request_id returns the first outcome: keys are scoped to
-- (tenant, principal, method) as memory's (0003_idempotency_scope.sql); the first call's
-- response (the serialized resource) and outbox position are kept with the key.
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

-- Transactional outbox, governance's (with the actor and traceparent): one row per change,
-- written in the transaction of the change; positions are drawn under an advisory lock at the end of the
-- transaction, so they become visible in commit order. Writers NOTIFY
-- aeterna_knowledge_changes with the last position.
CREATE TABLE outbox (
    position     bigint      PRIMARY KEY,
    tenant_id    text        NOT NULL,
    event_type   text        NOT NULL,
    resource     text        NOT NULL,
    actor        text        NOT NULL DEFAULT '',
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    traceparent  text        NOT NULL DEFAULT ''
);
CREATE SEQUENCE outbox_position;
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position DESC);
CREATE INDEX outbox_unpublished ON outbox (position) WHERE published_at IS NULL;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['knowledge_items', 'knowledge_revisions', 'knowledge_relations',
                             'idempotency_keys', 'outbox'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON knowledge_items, knowledge_relations, idempotency_keys,
    outbox TO {app_role};
GRANT SELECT, INSERT ON knowledge_revisions TO {app_role};
GRANT USAGE, SELECT ON SEQUENCE outbox_position TO {app_role};

CREATE POLICY background_read ON outbox FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT ON outbox TO {indexer_role};


-- The collector of expired idempotency keys runs as the owner (SECURITY DEFINER), admitted
-- by a policy bound to the owner alone and only to keys older than an hour (memory's 0003).
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

-- Readers of the outbox and the last position each has applied (governance's 0005): the
-- relay's row (relay:knowledge) is its cursor, fenced by the lease's epoch.
CREATE TABLE outbox_followers (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    epoch      bigint      NOT NULL DEFAULT 0
);
GRANT SELECT, INSERT, UPDATE ON outbox_followers TO {app_role};
