-- Search (issue 8, item 4): the retrieval chunks of each item (one per Markdown section,
-- aeterna_knowledge.chunking) with their embedding vectors, stored with the rows so that a
-- replica's embedded index is rebuilt from PostgreSQL without embedding anything again.
-- A chunk set belongs to one text of the item: source_hash is the SHA-256 of the text the
-- chunks were cut from (title, summary, content and the chunker's version), so an edited item
-- gets a new set and the old one is deleted in the same transaction. The replicas' followers
-- take an advisory lock per text before embedding it, so each text is embedded once.
CREATE TABLE knowledge_chunks (
    tenant_id       text        NOT NULL,
    item_id         uuid        NOT NULL,
    source_hash     text        NOT NULL,
    embedding_model text        NOT NULL,
    ordinal         smallint    NOT NULL CHECK (ordinal >= 0),
    point_id        uuid        NOT NULL,
    heading         text        NOT NULL,
    body            text        NOT NULL,
    embedding       real[]      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, item_id, source_hash, embedding_model, ordinal),
    FOREIGN KEY (tenant_id, item_id) REFERENCES knowledge_items (tenant_id, id) ON DELETE CASCADE
);
-- A search maps the index's hits (point ids, UUIDv5 of item id and ordinal) back to chunks.
CREATE INDEX knowledge_chunks_point ON knowledge_chunks (tenant_id, point_id);

ALTER TABLE knowledge_chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE knowledge_chunks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON knowledge_chunks TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));
GRANT SELECT, INSERT, DELETE ON knowledge_chunks TO {app_role};

-- Index maintenance (each replica's follower) reads every tenant's items and chunks as the
-- indexer role, SELECT only (ARCHITECTURE.md, "Database roles").
CREATE POLICY background_read ON knowledge_items FOR SELECT TO {indexer_role} USING (true);
CREATE POLICY background_read ON knowledge_chunks FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT ON knowledge_items, knowledge_chunks TO {indexer_role};
