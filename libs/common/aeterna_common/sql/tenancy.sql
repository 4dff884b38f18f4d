-- The sealed tenant binding every service's database uses (ARCHITECTURE.md, "Database
-- roles"), put in place of the {tenancy} line of a service migration by
-- aeterna_common.db.apply_migrations: a private schema with the binding keys,
-- aeterna_bind_tenant(tenant) (at most once per transaction) and aeterna_tenant() (the bound
-- tenant, or NULL when its seal does not verify), executable by the app role only; and
-- neither serving role may create objects.
CREATE SCHEMA aeterna_private;
REVOKE ALL ON SCHEMA aeterna_private FROM PUBLIC;

-- Two independent 244-bit keys (two random UUIDs each) for the nested keyed hash
-- sha256(outer || sha256(inner || message)), which, unlike sha256(key || message), admits no
-- length extension.
CREATE TABLE aeterna_private.tenant_binding_key (
    inner_key bytea NOT NULL,
    outer_key bytea NOT NULL
);
INSERT INTO aeterna_private.tenant_binding_key
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'),
       decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');

-- The seal of a tenant for the current transaction of the current backend (plpgsql, so its
-- query plan is cached per session).
CREATE FUNCTION aeterna_private.tenant_seal(tenant text) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k_in bytea;
    k_out bytea;
BEGIN
    SELECT inner_key, outer_key INTO k_in, k_out FROM aeterna_private.tenant_binding_key;
    RETURN encode(sha256(k_out || sha256(k_in || convert_to(
        tenant || '/' || pg_backend_pid()::text || '/'
        || (extract(epoch FROM now()) * 1000000)::bigint::text, 'UTF8'))), 'hex');
END
$$;

-- The tenant bound to the current transaction, or NULL. Policies call it once per statement
-- as (SELECT aeterna_tenant()).
CREATE FUNCTION aeterna_tenant() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    binding text := current_setting('aeterna.tenant_binding', true);
    cut integer;
BEGIN
    -- "<tenant>/<64 hex digits>"; tenant ids are 1-100 characters (DOMAIN.md, Tenancy).
    IF binding IS NULL OR length(binding) < 66 OR length(binding) > 165 THEN
        RETURN NULL;
    END IF;
    cut := length(binding) - 64;
    IF substr(binding, cut, 1) <> '/'
        OR substr(binding, cut + 1) <> aeterna_private.tenant_seal(left(binding, cut - 1)) THEN
        RETURN NULL;
    END IF;
    RETURN left(binding, cut - 1);
END
$$;

-- Bind the current transaction to a tenant, once. Raises 42501 when the transaction was
-- already bound (to whatever tenant, even if the setting was reset since).
CREATE FUNCTION aeterna_bind_tenant(tenant text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tenant IS NULL OR tenant !~ '^[A-Za-z0-9_-]{1,100}$' THEN
        RAISE EXCEPTION 'invalid tenant id' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND pid = pg_backend_pid()
          AND classid = 731104 AND objid = pg_backend_pid()::oid AND objsubid = 2
    ) THEN
        RAISE EXCEPTION 'this transaction is already bound to a tenant' USING ERRCODE = '42501';
    END IF;
    PERFORM pg_advisory_xact_lock(731104, pg_backend_pid());
    PERFORM set_config(
        'aeterna.tenant_binding', tenant || '/' || aeterna_private.tenant_seal(tenant), true);
END
$$;

REVOKE ALL ON FUNCTION aeterna_tenant() FROM PUBLIC;
REVOKE ALL ON FUNCTION aeterna_bind_tenant(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION aeterna_private.tenant_seal(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION aeterna_tenant() TO {app_role};
GRANT EXECUTE ON FUNCTION aeterna_bind_tenant(text) TO {app_role};

-- Neither serving role creates objects: no temporary tables, no schemas.
DO $$
BEGIN
    EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
