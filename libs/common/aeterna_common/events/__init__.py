"""Events on Redis Streams: the envelope, the outbox relay and consumer groups.

* :mod:`~aeterna_common.events.envelope`: the fixed envelope, stream keys and registry.
* :class:`OutboxRelay`: publishes a service's outbox to ``events:{tenant}``, at least once,
  on one replica at a time under a fenced lease.
* :class:`EventConsumer`: a consumer group over every tenant stream, with ``XAUTOCLAIM`` of
  stuck entries and a dead-letter stream after three deliveries; :class:`LeasedConsumer`
  runs one on the one replica holding a lease.
"""

from aeterna_common.events.consumer import EventConsumer, Handler, LeasedConsumer, consumer_redis
from aeterna_common.events.envelope import (
    STREAMS_KEY,
    Event,
    MalformedEventError,
    current_traceparent,
    dead_letter_key,
    stream_key,
)
from aeterna_common.events.relay import (
    OutboxRelay,
    RelaySettings,
    StreamTrim,
    relay_from_settings,
)

__all__ = [
    "STREAMS_KEY",
    "Event",
    "EventConsumer",
    "Handler",
    "LeasedConsumer",
    "MalformedEventError",
    "OutboxRelay",
    "RelaySettings",
    "StreamTrim",
    "consumer_redis",
    "current_traceparent",
    "dead_letter_key",
    "relay_from_settings",
    "stream_key",
]
