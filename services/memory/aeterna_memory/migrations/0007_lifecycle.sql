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
