-- Memories, their revisions, idempotency keys and the outbox, all under forced row-level
-- security. The application role sees only rows of the tenant set with
-- set_config('app.tenant_id', ...) in its transaction. Index maintenance may read (never
-- write) every tenant in a read-only transaction that sets app.all_tenants = 'on'.

CREATE TABLE memories (
    tenant_id        text        NOT NULL,
    id               uuid        NOT NULL,
    layer            smallint    NOT NULL CHECK (layer BETWEEN 1 AND 7),
    agent_id         text,
    user_id          text,
    session_id       text,
    project_id       text,
    team_id          text,
    org_id           text,
    company_id       text,
    content          text        NOT NULL,
    content_hash     text        NOT NULL,
    metadata         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    tags             text[]      NOT NULL DEFAULT '{}',
    importance       double precision NOT NULL DEFAULT 0.5 CHECK (importance BETWEEN 0 AND 1),
    access_count     bigint      NOT NULL DEFAULT 0,
    last_accessed_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    expire_at        timestamptz,
    deleted_at       timestamptz,
    revision         bigint      NOT NULL DEFAULT 1,
    -- Vectors are stored with the row (and the BM25 context beside the content): an index
    -- is a view derived from these, rebuilt without embedding anything again.
    index_context    text[]      NOT NULL DEFAULT '{}',
    embedding_model  text        NOT NULL,
    embedding        real[]      NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX memories_list ON memories (tenant_id, created_at DESC, id DESC);
CREATE INDEX memories_session ON memories (tenant_id, user_id, session_id, created_at DESC);
CREATE INDEX memories_tags ON memories USING gin (tags);

CREATE TABLE memory_revisions (
    tenant_id      text        NOT NULL,
    memory_id      uuid        NOT NULL,
    revision       bigint      NOT NULL,
    action         smallint    NOT NULL CHECK (action BETWEEN 1 AND 3),
    old_content    text,
    new_content    text,
    changed_fields text[]      NOT NULL DEFAULT '{}',
    actor          text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, memory_id, revision),
    FOREIGN KEY (tenant_id, memory_id) REFERENCES memories (tenant_id, id)
);

-- A retried create or feedback with the same request_id returns the first outcome.
CREATE TABLE idempotency_keys (
    tenant_id   text        NOT NULL,
    method      text        NOT NULL,
    request_id  text        NOT NULL,
    request_hash text       NOT NULL,
    memory_ids  uuid[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, method, request_id)
);

-- Transactional outbox: one row per change, written in the transaction of the change.
-- position is drawn under an advisory lock at the end of each writing transaction, so
-- positions become visible in commit order and a follower reading "position > p" misses
-- nothing.
CREATE TABLE outbox (
    position     bigint      PRIMARY KEY,
    tenant_id    text        NOT NULL,
    event_type   text        NOT NULL,
    resource     text        NOT NULL,
    memory_id    uuid,
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);
CREATE SEQUENCE outbox_position;
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position DESC);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['memories', 'memory_revisions', 'idempotency_keys', 'outbox'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I USING '
            '(tenant_id = current_setting(''app.tenant_id'', true)) WITH CHECK '
            '(tenant_id = current_setting(''app.tenant_id'', true))', t);
    END LOOP;
END $$;

CREATE POLICY index_maintenance ON memories FOR SELECT
    USING (current_setting('app.all_tenants', true) = 'on');
CREATE POLICY index_maintenance ON outbox FOR SELECT
    USING (current_setting('app.all_tenants', true) = 'on');

GRANT SELECT, INSERT, UPDATE, DELETE ON memories, memory_revisions, idempotency_keys, outbox
    TO {app_role};
GRANT USAGE, SELECT ON SEQUENCE outbox_position TO {app_role};
