-- Billable usage of every service per tenant and hour, folded from the services'
-- `{service}.usage.reported` events and counted from every event consumed (issue 10).
CREATE TABLE tenant_usage_hourly (
    tenant_id  text        NOT NULL,
    hour       timestamptz NOT NULL,
    service    text        NOT NULL,
    metric     text        NOT NULL,
    quantity   bigint      NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (tenant_id, hour, service, metric)
);

-- The last outbox position of each service folded per tenant: a re-delivered event (at least
-- once) is at or below it and counts nothing. A tenant stream carries a service's events in
-- position order, and the one consumer folds them in stream order.
CREATE TABLE usage_cursors (
    tenant_id  text   NOT NULL,
    service    text   NOT NULL,
    position   bigint NOT NULL,
    PRIMARY KEY (tenant_id, service)
);

-- Budget thresholds already announced, once per tenant, month and threshold.
CREATE TABLE budget_notices (
    tenant_id          text        NOT NULL,
    month              date        NOT NULL,
    threshold_percent  integer     NOT NULL,
    cost               double precision NOT NULL,
    noticed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, month, threshold_percent)
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenant_usage_hourly', 'usage_cursors', 'budget_notices'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I TO {app_role}', t);
    END LOOP;
END $$;
