-- Applied outbox position of each shared vector index (Qdrant server mode). Not tenant data:
-- one row per index, written only by the follower holding the index's lease.
CREATE TABLE index_cursors (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON index_cursors TO {app_role};
