-- Events on Redis Streams: governance's outbox relayed by aeterna_common.events.OutboxRelay,
-- as memory's 0007 and 0008 do for memory's.
--
-- traceparent: the W3C trace context of the request that made the change, or empty.
-- outbox_followers: readers of the outbox and the last position each has applied. The
-- relay's row (relay:governance) is its cursor: the last position published, written only
-- under the lease governance:events:relay and refused from an epoch older than the last
-- writer's (epoch). The relay's row never expires, so no trim drops a row it has not
-- published. Not tenant data: no row-level security, the application role only.
ALTER TABLE outbox ADD COLUMN traceparent text NOT NULL DEFAULT '';

CREATE TABLE outbox_followers (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    epoch      bigint      NOT NULL DEFAULT 0
);
GRANT SELECT, INSERT, UPDATE ON outbox_followers TO {app_role};
