-- The first TENANT_ADMIN of a tenant. In production token roles are not trusted, so before
-- a tenant has a tenant admin no RPC can create one; `aeterna-governance bootstrap` writes
-- that binding as the owner role (the role that runs this file, like `migrate`). These
-- policies admit the owner to exactly that and no more, under the forced row-level security
-- of 0001: reading tenant-wide TENANT_ADMIN bindings (to stay idempotent), inserting one
-- created by the bootstrap actor, and inserting and returning its outbox event, which the
-- relay publishes and the audit log records like any other change.
CREATE POLICY bootstrap_read ON role_bindings FOR SELECT TO CURRENT_USER
    USING (role = 6 AND org_unit_id IS NULL);
CREATE POLICY bootstrap_insert ON role_bindings FOR INSERT TO CURRENT_USER
    WITH CHECK (role = 6 AND org_unit_id IS NULL AND creator = 'services/governance-bootstrap');
CREATE POLICY bootstrap_event ON outbox FOR ALL TO CURRENT_USER
    USING (actor = 'services/governance-bootstrap'
           AND event_type = 'governance.role_binding.created')
    WITH CHECK (actor = 'services/governance-bootstrap'
                AND event_type = 'governance.role_binding.created');
