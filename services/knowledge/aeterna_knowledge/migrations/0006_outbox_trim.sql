-- Outbox trim (memory's 0007). Each replica's index follower reports its applied position in
-- outbox_followers with an expiry, renewed while it runs; the event relay's row is there too.
-- trim_outbox() deletes, in bounded batches, the rows at or below the smallest position among
-- the reports that have not expired, and records the highest position trimmed in
-- outbox_trim. A follower that stops reporting blocks trimming only until its report expires;
-- if it comes back behind outbox_trim.upto, it finds that out in the snapshot it reads
-- changes from and rebuilds its index from the items instead of skipping the trimmed changes.
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
