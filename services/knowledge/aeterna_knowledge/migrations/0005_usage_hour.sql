-- The anomaly job reads the usage rows of the last two hours every interval
-- (aeterna_common.anomaly.UsageWindow): an index on the hour keeps that read small as the
-- hourly history grows.
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);
