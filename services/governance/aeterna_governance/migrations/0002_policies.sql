-- Policies with their rules, suppressions and drift reports, under the tenant isolation of
-- 0001_governance.sql (forced RLS, policies bound to the application role and the tenant of
-- aeterna_bind_tenant()).
--
-- A policy's rules are one JSONB array (1-200 objects with the PolicyRule fields: id, type,
-- target, operator, value, severity, message; enums as their proto numbers): they are always
-- read, written and resolved as a whole, and validated by the service before they are
-- written (RE2 patterns compile, values fit). revision is the etag (AIP-154).
CREATE TABLE policies (
    tenant_id      text        NOT NULL,
    id             text        NOT NULL CHECK (id ~ '^[a-z0-9-]{1,63}$'),
    org_unit_id    text        NOT NULL,
    display_name   text        NOT NULL CHECK (char_length(display_name) BETWEEN 1 AND 200),
    mode           smallint    NOT NULL CHECK (mode IN (1, 2)),
    merge_strategy smallint    NOT NULL CHECK (merge_strategy BETWEEN 1 AND 3),
    rules          jsonb       NOT NULL CHECK (jsonb_typeof(rules) = 'array'
                                               AND jsonb_array_length(rules) BETWEEN 1 AND 200),
    revision       bigint      NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    -- A unit with policies cannot be deleted before them (no silent loss of rules).
    FOREIGN KEY (tenant_id, org_unit_id) REFERENCES org_units (tenant_id, id)
);
CREATE INDEX policies_unit ON policies (tenant_id, org_unit_id, id);

-- One rule of one policy not counted at a unit and below until expire_at. Deleting the
-- policy deletes its suppressions (its governance.policy.deleted event says so).
CREATE TABLE suppressions (
    tenant_id   text        NOT NULL,
    id          uuid        NOT NULL,
    policy_id   text        NOT NULL,
    rule_id     text        NOT NULL CHECK (rule_id ~ '^[a-z0-9._-]{1,64}$'),
    org_unit_id text        NOT NULL,
    reason      text        NOT NULL CHECK (char_length(reason) BETWEEN 1 AND 1000),
    expire_at   timestamptz NOT NULL,
    creator     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, policy_id) REFERENCES policies (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, org_unit_id) REFERENCES org_units (tenant_id, id)
);
CREATE INDEX suppressions_list ON suppressions (tenant_id, created_at, id);
CREATE INDEX suppressions_active ON suppressions (tenant_id, policy_id, rule_id, expire_at);

-- A unit's last drift check: every violation found (policy, rule_id, severity, message), as
-- a JSONB array. Suppressions are applied when the report is read, as of then.
CREATE TABLE drift_reports (
    tenant_id   text        NOT NULL,
    org_unit_id text        NOT NULL,
    violations  jsonb       NOT NULL CHECK (jsonb_typeof(violations) = 'array'),
    check_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, org_unit_id),
    FOREIGN KEY (tenant_id, org_unit_id) REFERENCES org_units (tenant_id, id) ON DELETE CASCADE
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['policies', 'suppressions', 'drift_reports'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO {app_role} '
            'USING (tenant_id = (SELECT aeterna_tenant())) '
            'WITH CHECK (tenant_id = (SELECT aeterna_tenant()))', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON policies, suppressions, drift_reports TO {app_role};
