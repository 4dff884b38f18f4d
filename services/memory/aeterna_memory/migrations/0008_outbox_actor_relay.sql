-- Events on Redis Streams.
--
-- actor: who caused each change (users/{u}, users/{u}/agents/{a} or services/{name}), for the
-- audit log; empty on rows written before this migration.
-- traceparent: the W3C trace context of the request that made the change, or empty.
-- epoch on outbox_followers: the outbox relay's row there is its cursor (the last position
-- published), written only under the relay's lease and refused from an epoch older than
-- the last writer's. The relay's row never expires, so the trim keeps every unpublished row.
ALTER TABLE outbox ADD COLUMN actor text NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN traceparent text NOT NULL DEFAULT '';
ALTER TABLE outbox_followers ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
