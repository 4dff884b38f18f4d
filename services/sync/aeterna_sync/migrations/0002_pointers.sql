-- Knowledge → memory pointers: which pointer memory stands for which accepted knowledge item
-- (with the item's content hash and status when the pointer was written), and the tenant's
-- sync cycles (the last one is GetSyncStatus's). Forced row-level security, as 0001's tables.

CREATE TABLE sync_pointers (
    tenant_id      text        NOT NULL,
    knowledge_item text        NOT NULL,
    memory         text        NOT NULL,
    content_hash   text        NOT NULL,
    layer          smallint    NOT NULL CHECK (layer BETWEEN 4 AND 7),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, knowledge_item)
);

CREATE TABLE sync_cycles (
    tenant_id       text        NOT NULL,
    id              uuid        NOT NULL,
    state           smallint    NOT NULL CHECK (state BETWEEN 1 AND 4),
    start_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time        timestamptz,
    items_examined  bigint      NOT NULL DEFAULT 0,
    conflicts_found bigint      NOT NULL DEFAULT 0,
    failed_items    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX sync_cycles_recent ON sync_cycles (tenant_id, start_time DESC);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['sync_pointers', 'sync_cycles'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON sync_pointers, sync_cycles TO {app_role};
