-- Device pulls list a tenant's memories oldest change first from a cursor
-- (ListMemories order_by "update_time", min_update_time; aeterna_sync.devices): a keyset index
-- on the update time keeps each page a range read instead of a sort of the tenant's rows.
CREATE INDEX memories_list_updated ON memories (tenant_id, updated_at, id);
