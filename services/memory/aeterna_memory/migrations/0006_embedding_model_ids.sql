-- Embedding model ids name the vector space: model name (with its precision) and dimension,
-- `{name}/{dimension}`, e.g. `all-MiniLM-L6-v2-int8/384`. Rows written before carry the name
-- alone; give them the id of the vectors they hold. The owner is subject to the forced
-- row-level security like everyone else, so it lifts FORCE for this one transaction.
ALTER TABLE memories NO FORCE ROW LEVEL SECURITY;
UPDATE memories SET embedding_model = embedding_model || '/' || cardinality(embedding)
    WHERE embedding_model NOT LIKE '%/%';
ALTER TABLE memories FORCE ROW LEVEL SECURITY;
-- Replicas poll for vectors of another model than theirs: an index makes that two short
-- range scans instead of a full scan.
CREATE INDEX memories_embedding_model ON memories (embedding_model);

-- The model id of each shared index's vectors, beside its applied position.
ALTER TABLE index_cursors ADD COLUMN model text;
