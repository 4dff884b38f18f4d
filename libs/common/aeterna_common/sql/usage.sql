-- Billable usage of one service's tenants, kept hourly (issue 10, item 4), put in place of the
-- {usage} line of a service migration by aeterna_common.db.apply_migrations. A unit of work
-- adds its usage to its tenant's row of the hour in its own transaction
-- (aeterna_common.usage.record_usage); the reporter job later moves what was not reported
-- yet ("quantity - reported") to governance through the outbox, in one transaction with the
-- outbox event, so every unit is reported exactly once.
CREATE TABLE usage_hourly (
    tenant_id  text        NOT NULL,
    hour       timestamptz NOT NULL,
    metric     text        NOT NULL,
    quantity   bigint      NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    reported   bigint      NOT NULL DEFAULT 0 CHECK (reported >= 0 AND reported <= quantity),
    PRIMARY KEY (tenant_id, hour, metric)
);
-- The reporter finds the tenants with something to report.
CREATE INDEX usage_hourly_unreported ON usage_hourly (tenant_id) WHERE quantity > reported;
ALTER TABLE usage_hourly ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_hourly FORCE ROW LEVEL SECURITY;
CREATE POLICY usage_hourly_tenant ON usage_hourly TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));
CREATE POLICY usage_hourly_indexer ON usage_hourly FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT, INSERT, UPDATE ON usage_hourly TO {app_role};
GRANT SELECT ON usage_hourly TO {indexer_role};
