"""Per-tenant usage, cost and budgets (issue 10, item 4): the ledger and its settings."""
