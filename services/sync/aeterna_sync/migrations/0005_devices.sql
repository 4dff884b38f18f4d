-- Device sync (issue 9, item 5): each device's push sequence (its push cursor) and, per
-- pushed (device, entry, revision), the memory it went to and whether it lost, so a retried
-- push is answered from here and never applied twice. Contents stay in memory, whose own
-- rules decide every read and write. Forced row-level security, as 0001's tables.

CREATE TABLE sync_devices (
    tenant_id    text        NOT NULL,
    user_id      text        NOT NULL,
    device_id    text        NOT NULL,
    push_seq     bigint      NOT NULL DEFAULT 0,
    last_push_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, user_id, device_id)
);

CREATE TABLE sync_device_entries (
    tenant_id  text        NOT NULL,
    user_id    text        NOT NULL,
    device_id  text        NOT NULL,
    entry_id   text        NOT NULL,
    revision   bigint      NOT NULL,
    memory     text        NOT NULL,
    -- '' applied; 'LOST' lost to a newer version; else the reason memory refused it.
    outcome    text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, user_id, device_id, entry_id, revision)
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['sync_devices', 'sync_device_entries'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON sync_devices, sync_device_entries TO {app_role};
