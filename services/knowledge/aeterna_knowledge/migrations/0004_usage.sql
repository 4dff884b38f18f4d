-- Billable usage per tenant and hour (issue 10): the table every billing service keeps,
-- written in the transaction of each item create and update, reported to governance through
-- the outbox (aeterna_common.usage).
{usage}
