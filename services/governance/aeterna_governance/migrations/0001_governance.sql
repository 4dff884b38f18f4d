-- Governance: the org tree, role bindings, delegations, approval requests, idempotency keys,
-- the outbox and leases, under forced row-level security with the three roles of memory's
-- 0004_roles_and_leases.sql (ARCHITECTURE.md, "Database roles"):
--
-- owner (runs this file): owns every table, function and schema; serves nothing. Tables keep
--   FORCE ROW LEVEL SECURITY and no tenant policy names the owner.
-- app ({app_role}): serves requests. Its tenant_isolation policies admit only rows of the
--   tenant bound to the transaction by aeterna_bind_tenant(), a binding sealed with a keyed
--   hash only the owner can read, so no setting the app role can change reveals another
--   tenant.
-- indexer ({indexer_role}): SELECT across tenants of what background work must find (the
--   outbox, for the relay; approval requests due to expire), nothing else.

{tenancy}

-- The org tree: COMPANY (1) ⊃ ORGANIZATION (2) ⊃ TEAM (3) ⊃ PROJECT (4). A unit's parent is
-- of the kind just above it (checked by the service, and here: parent_kind = kind - 1), so
-- the tree is at most four deep. revision is the etag (AIP-154), bumped by every change.
CREATE TABLE org_units (
    tenant_id    text        NOT NULL,
    id           text        NOT NULL CHECK (id ~ '^[a-z0-9-]{1,63}$'),
    kind         smallint    NOT NULL CHECK (kind BETWEEN 1 AND 4),
    display_name text        NOT NULL CHECK (char_length(display_name) BETWEEN 1 AND 200),
    parent_id    text,
    parent_kind  smallint,
    revision     bigint      NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, id, kind),
    FOREIGN KEY (tenant_id, parent_id, parent_kind) REFERENCES org_units (tenant_id, id, kind),
    CHECK ((kind = 1 AND parent_id IS NULL AND parent_kind IS NULL)
        OR (kind > 1 AND parent_id IS NOT NULL AND parent_kind = kind - 1))
);
CREATE INDEX org_units_parent ON org_units (tenant_id, parent_id);

-- Roles: 1 VIEWER .. 5 ADMIN, 6 TENANT_ADMIN, 7 PLATFORM_ADMIN, 8 AGENT (the proto's enum).
-- A binding without a unit holds for the whole tenant (TENANT_ADMIN, PLATFORM_ADMIN only).
CREATE TABLE role_bindings (
    tenant_id   text        NOT NULL,
    id          uuid        NOT NULL,
    subject     text        NOT NULL,
    role        smallint    NOT NULL CHECK (role BETWEEN 1 AND 8),
    org_unit_id text,
    creator     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, org_unit_id) REFERENCES org_units (tenant_id, id),
    CHECK (org_unit_id IS NOT NULL OR role IN (6, 7))
);
CREATE UNIQUE INDEX role_bindings_unique
    ON role_bindings (tenant_id, subject, role, coalesce(org_unit_id, ''));
CREATE INDEX role_bindings_unit ON role_bindings (tenant_id, org_unit_id);

-- Delegations: an agent acts for a user with capabilities; depth 1 (from the user) to 3.
-- state 1 ACTIVE, 2 REVOKED. A revocation revokes the delegations made from it, in the same
-- transaction.
CREATE TABLE delegations (
    tenant_id    text        NOT NULL,
    id           uuid        NOT NULL,
    user_id      text        NOT NULL,
    agent_id     text        NOT NULL,
    capabilities text[]      NOT NULL CHECK (cardinality(capabilities) BETWEEN 1 AND 32),
    parent_id    uuid,
    depth        smallint    NOT NULL CHECK (depth BETWEEN 1 AND 3),
    state        smallint    NOT NULL DEFAULT 1 CHECK (state IN (1, 2)),
    creator      text        NOT NULL,
    expire_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    revoked_at   timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, parent_id) REFERENCES delegations (tenant_id, id),
    CHECK ((parent_id IS NULL) = (depth = 1))
);
CREATE INDEX delegations_parent ON delegations (tenant_id, parent_id);
CREATE INDEX delegations_agent ON delegations (tenant_id, agent_id, created_at);

-- Approval requests and one decision per approver. required_approvals is fixed at creation
-- (SINGLE 1, QUORUM 2-10, UNANIMOUS the number of eligible approvers then, recorded in
-- eligible). state 1 PENDING, 2 APPROVED, 3 REJECTED, 4 EXPIRED, 5 CANCELLED.
CREATE TABLE approval_requests (
    tenant_id          text        NOT NULL,
    id                 uuid        NOT NULL,
    type               smallint    NOT NULL CHECK (type BETWEEN 1 AND 5),
    risk_level         smallint    NOT NULL CHECK (risk_level BETWEEN 1 AND 4),
    mode               smallint    NOT NULL CHECK (mode BETWEEN 1 AND 3),
    required_approvals integer     NOT NULL CHECK (required_approvals BETWEEN 1 AND 1000),
    eligible           text[]      NOT NULL DEFAULT '{}',
    org_unit_id        text,
    target             text        NOT NULL,
    title              text        NOT NULL,
    payload            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    requester          text        NOT NULL,
    state              smallint    NOT NULL DEFAULT 1 CHECK (state BETWEEN 1 AND 5),
    revision           bigint      NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    expire_at          timestamptz NOT NULL,
    closed_at          timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, org_unit_id) REFERENCES org_units (tenant_id, id)
);
CREATE INDEX approval_requests_list ON approval_requests (tenant_id, created_at DESC, id DESC);
-- The expiry job finds due requests of every tenant (as the indexer) with this index.
CREATE INDEX approval_requests_due ON approval_requests (expire_at) WHERE state = 1;

CREATE TABLE approval_decisions (
    tenant_id  text        NOT NULL,
    request_id uuid        NOT NULL,
    approver   text        NOT NULL,
    approve    boolean     NOT NULL,
    comment    text        NOT NULL DEFAULT '' CHECK (char_length(comment) <= 2000),
    decided_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, request_id, approver),
    FOREIGN KEY (tenant_id, request_id) REFERENCES approval_requests (tenant_id, id)
);

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

-- Transactional outbox, the shape of memory's plus the actor: one row per change, written in
-- the transaction of the change; positions are drawn under an advisory lock at the end of the
-- transaction, so they become visible in commit order. Writers NOTIFY
-- aeterna_governance_changes with the last position.
CREATE TABLE outbox (
    position     bigint      PRIMARY KEY,
    tenant_id    text        NOT NULL,
    event_type   text        NOT NULL,
    resource     text        NOT NULL,
    actor        text        NOT NULL DEFAULT '',
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);
CREATE SEQUENCE outbox_position;
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position DESC);
CREATE INDEX outbox_unpublished ON outbox (position) WHERE published_at IS NULL;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['org_units', 'role_bindings', 'delegations', 'approval_requests',
                             'approval_decisions', 'idempotency_keys', 'outbox'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON org_units, role_bindings, delegations,
    approval_requests, approval_decisions, idempotency_keys, outbox TO {app_role};
GRANT USAGE, SELECT ON SEQUENCE outbox_position TO {app_role};

CREATE POLICY background_read ON outbox FOR SELECT TO {indexer_role} USING (true);
CREATE POLICY background_read ON approval_requests FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT ON outbox, approval_requests TO {indexer_role};

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
