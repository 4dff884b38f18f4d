"""The audit log: every event of every service, per tenant, append-only and hash-chained.

* :mod:`.chain`: entries, their RFC 8785 canonical form and SHA-256 hash, envelopes.
* :mod:`.log`: appends (serialised per tenant, idempotent by event id), listing,
  verification, checkpoints, in PostgreSQL (``0003_audit.sql``).
* :mod:`.verify`: the chain check against checkpoints, naming the first broken entry.
* :mod:`.consumer`: the event streams into the chains, once each, in stream order.

Performance: appends of one tenant are serialised (a transaction-level advisory lock per
tenant), so one tenant's chain grows at most at the rate of one append transaction after
another; tenants append in parallel. Measured once with ``bench/audit_append.py`` (2,000
appends, throwaway PostgreSQL with fsync off, 2 cores under a load average of ~7 from other
work): one tenant from one task ~800 appends/s; one tenant from 8 tasks ~480/s (they queue
on the lock); 8 tenants from 8 tasks ~1,290/s in total.
"""
