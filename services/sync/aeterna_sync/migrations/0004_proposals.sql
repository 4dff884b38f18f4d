-- Memory → knowledge proposals: one row per (tenant, memory, revision) that passed the
-- promotion threshold. The row is written before knowledge is called (with the score that
-- decided), and the transaction that proposes holds it (FOR UPDATE) until it is marked
-- PROPOSED: a retried or concurrent cycle waits for it and then finds it done, so a memory
-- revision is proposed exactly once. Forced row-level security, as 0001's tables.

CREATE TABLE sync_proposals (
    tenant_id      text             NOT NULL,
    memory         text             NOT NULL,
    revision       bigint           NOT NULL CHECK (revision >= 0),
    score          double precision NOT NULL CHECK (score BETWEEN 0 AND 1),
    -- PENDING (decided, not yet written), PROPOSED (the draft exists and is PROPOSED),
    -- FAILED (knowledge refused or was unreachable; retried by the next cycle or event).
    state          text             NOT NULL CHECK (state IN ('PENDING', 'PROPOSED', 'FAILED')),
    knowledge_item text             NOT NULL DEFAULT '',
    knowledge_type smallint         NOT NULL DEFAULT 0,
    attempts       integer          NOT NULL DEFAULT 0,
    detail         text             NOT NULL DEFAULT '' CHECK (char_length(detail) <= 2000),
    created_at     timestamptz      NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, memory, revision)
);
CREATE INDEX sync_proposals_state ON sync_proposals (tenant_id, state);

ALTER TABLE sync_proposals ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_proposals FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sync_proposals TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));

GRANT SELECT, INSERT, UPDATE ON sync_proposals TO {app_role};
