-- Memory lifecycle: expiry events and purge after retention.
--
-- expired_at records when the expiry job processed a memory whose expire_at had passed (it
-- wrote the memory.expired outbox event in the same transaction), so each expired memory is
-- processed once. A purge deletes the memory row but keeps its revisions with their
-- metadata only (ids, action, actor, time, changed fields; the content columns are set to
-- NULL), so revisions no longer reference a memory row.
ALTER TABLE memories ADD COLUMN expired_at timestamptz;
ALTER TABLE memory_revisions DROP CONSTRAINT memory_revisions_tenant_id_memory_id_fkey;

-- The jobs find their work across tenants as the indexer role with these two partial
-- indexes, then act per tenant as the application role.
CREATE INDEX memories_expiry_due ON memories (expire_at)
    WHERE expired_at IS NULL AND expire_at IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX memories_purge_due ON memories ((coalesce(deleted_at, expire_at)))
    WHERE deleted_at IS NOT NULL OR expire_at IS NOT NULL;
CREATE INDEX memory_revisions_memory ON memory_revisions (tenant_id, memory_id);

-- Decay of importance: decayed_at is when importance was last multiplied by
-- (1 - daily rate of the layer)^days since the previous decay (created_at before the first);
-- archived_at is set when importance fell below 0.01 (archived memories are neither indexed
-- nor searched, and are listed only with show_deleted, until the cold tier exists).
ALTER TABLE memories ADD COLUMN decayed_at timestamptz;
ALTER TABLE memories ADD COLUMN archived_at timestamptz;
CREATE INDEX memories_decay_due ON memories ((coalesce(decayed_at, created_at)))
    WHERE archived_at IS NULL AND deleted_at IS NULL;

-- Outbox trim. Each follower that applies the outbox (an embedded replica's index, the
-- leader of a shared index) reports its applied position in outbox_followers with an expiry,
-- renewed while it runs. trim_outbox() deletes, in bounded batches, the rows at or below the
-- smallest position among the followers whose report has not expired, and records the
-- highest position trimmed in outbox_trim. A follower that stops reporting therefore blocks
-- trimming only until its report expires; if it comes back behind outbox_trim.upto, it
-- finds that out in the snapshot it reads changes from and rebuilds its index from the
-- memories instead of skipping the trimmed changes.
CREATE TABLE outbox_followers (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_followers TO {app_role};

CREATE TABLE outbox_trim (
    id   smallint PRIMARY KEY CHECK (id = 1),
    upto bigint   NOT NULL
);
INSERT INTO outbox_trim VALUES (1, 0);
GRANT SELECT ON outbox_trim TO {app_role}, {indexer_role};

-- The trim runs as the owner (SECURITY DEFINER); this policy admits the owner to the outbox
-- rows of every tenant. No serving role is the owner.
CREATE POLICY outbox_trim ON outbox FOR ALL TO CURRENT_USER USING (true);

CREATE FUNCTION trim_outbox(batch integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    bound bigint;
    deleted integer;
    top bigint;
BEGIN
    SELECT min(position) INTO bound FROM outbox_followers WHERE expires_at > now();
    IF bound IS NULL THEN
        RETURN 0;
    END IF;
    -- One trim at a time: the watermark row is locked until commit.
    PERFORM 1 FROM outbox_trim WHERE id = 1 FOR UPDATE;
    WITH doomed AS (
        SELECT position FROM outbox WHERE position <= bound
        ORDER BY position LIMIT least(greatest(batch, 1), 10000)
    ), gone AS (
        DELETE FROM outbox o USING doomed WHERE o.position = doomed.position
        RETURNING o.position
    )
    SELECT count(*)::integer, max(position) INTO deleted, top FROM gone;
    IF top IS NOT NULL THEN
        UPDATE outbox_trim SET upto = greatest(upto, top) WHERE id = 1;
    END IF;
    RETURN deleted;
END
$$;
REVOKE ALL ON FUNCTION trim_outbox(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trim_outbox(integer) TO {app_role};

-- Automatic promotion: a promoted copy records its source in metadata (original_memory,
-- original_revision); this index answers "was this revision promoted already".
CREATE INDEX memories_original ON memories (tenant_id, (metadata->>'original_memory'))
    WHERE metadata ? 'original_memory';
