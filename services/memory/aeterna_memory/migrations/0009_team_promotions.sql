-- Promotions of PROJECT memories to the TEAM layer, which need a governance approval
-- (DOMAIN.md, Memory: Promotion). One row per memory revision asked for: the promotion job
-- asks governance once per revision (the primary key), and the approval's outcome is
-- recorded here once (state leaves 'pending' once):
--   pending    asked, not decided yet;
--   promoted   approved, the TEAM copy (copy_id) was created;
--   rejected, expired, cancelled   governance's final state: nothing is created;
--   skipped    approved, but the memory changed, was deleted, expired or archived meanwhile
--              (reason says which): nothing is created.
-- promotion_score and content_sha256 are those of the copy asked for, so that the copy made
-- on approval is the one the approvers saw.
CREATE TABLE memory_promotions (
    tenant_id        text        NOT NULL,
    memory_id        uuid        NOT NULL,
    revision         bigint      NOT NULL,
    approval_request text        NOT NULL,
    team_id          text        NOT NULL,
    promotion_score  double precision NOT NULL,
    content_sha256   text        NOT NULL,
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN
        ('pending', 'promoted', 'rejected', 'expired', 'cancelled', 'skipped')),
    reason           text        NOT NULL DEFAULT '',
    copy_id          uuid,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    checked_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    closed_at        timestamptz,
    PRIMARY KEY (tenant_id, memory_id, revision),
    UNIQUE (tenant_id, approval_request)
);
-- The reconciler visits pending rows least recently checked first.
CREATE INDEX memory_promotions_pending ON memory_promotions (checked_at) WHERE state = 'pending';

ALTER TABLE memory_promotions ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory_promotions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON memory_promotions TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));
-- The job finds memories not asked for yet, and the reconciler pending rows, across tenants.
CREATE POLICY index_maintenance ON memory_promotions FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON memory_promotions TO {app_role};
GRANT SELECT ON memory_promotions TO {indexer_role};
