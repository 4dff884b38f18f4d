-- Pointer cycles that survive their replica, duplicate pointers, failed items and conflicts
-- resolved by a call (issue 9).
--
-- * sync_pointers holds one row per (item, pointer memory): two rows for one item is a
--   DUPLICATE_POINTER the next cycle resolves.
-- * sync_cycles records its checkpoint (the last item done, items sorted by name) as it goes;
--   a cycle left RUNNING by a dead replica is resumed from there by the next holder of the
--   tenant's lease (resumes counts how often).
-- * sync_failed_items: items whose pointer could not be written, retried with exponential
--   backoff (next_attempt_at) and deleted after the retention (30 days by default).
-- * sync_conflicts.fingerprint names the state a conflict was found in; resolved_by names
--   who resolved it by a call ('' for the cycle itself), so a conflict left open or settled
--   by a call is not reported again until the item changes.

ALTER TABLE sync_pointers DROP CONSTRAINT sync_pointers_pkey;
ALTER TABLE sync_pointers ADD PRIMARY KEY (tenant_id, knowledge_item, memory);

ALTER TABLE sync_cycles
    ADD COLUMN checkpoint text    NOT NULL DEFAULT '',
    ADD COLUMN resumes    integer NOT NULL DEFAULT 0 CHECK (resumes >= 0),
    ADD COLUMN reason     text    NOT NULL DEFAULT '' CHECK (char_length(reason) <= 40);
CREATE INDEX sync_cycles_running ON sync_cycles (tenant_id) WHERE state = 2;  -- RUNNING

ALTER TABLE sync_conflicts
    ADD COLUMN fingerprint text NOT NULL DEFAULT '' CHECK (char_length(fingerprint) <= 400),
    ADD COLUMN resolved_by text NOT NULL DEFAULT '' CHECK (char_length(resolved_by) <= 300);
CREATE INDEX sync_conflicts_item ON sync_conflicts (tenant_id, knowledge_item, fingerprint);

CREATE TABLE sync_failed_items (
    tenant_id       text        NOT NULL,
    knowledge_item  text        NOT NULL,
    attempts        integer     NOT NULL CHECK (attempts > 0),
    last_error      text        NOT NULL DEFAULT '' CHECK (char_length(last_error) <= 2000),
    first_failed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_failed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    next_attempt_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, knowledge_item)
);
CREATE INDEX sync_failed_items_age ON sync_failed_items (tenant_id, first_failed_at);

ALTER TABLE sync_failed_items ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_failed_items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sync_failed_items TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));
GRANT SELECT, INSERT, UPDATE, DELETE ON sync_failed_items TO {app_role};
