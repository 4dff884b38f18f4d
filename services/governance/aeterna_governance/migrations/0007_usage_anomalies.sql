-- Governance's own usage fed to its anomaly detector (aeterna_common.anomaly.UsageWindow):
-- every interval the job reads the last two hours of the ledger across tenants as the
-- indexer role, so that role may SELECT it, and an index on the hour keeps the read small.
CREATE POLICY background_read ON tenant_usage_hourly FOR SELECT TO {indexer_role} USING (true);
GRANT SELECT ON tenant_usage_hourly TO {indexer_role};
CREATE INDEX tenant_usage_hourly_hour ON tenant_usage_hourly (hour);
