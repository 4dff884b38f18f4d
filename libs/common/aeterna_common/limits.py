"""Wire limits shared by every server and client, so that both ends agree.

gRPC's own default receive limit is 4 MiB; requests keep it. Responses may be larger than the
request that asked for them (a search returns up to 100 memories of up to 32 KiB content and
16 KiB metadata each, about 5 MiB), so they get twice as much. A message over a limit is
refused by gRPC with ``RESOURCE_EXHAUSTED`` before any handler runs.
"""

from __future__ import annotations

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest request message in bytes: the server's receive limit and the clients' send limit
(gRPC's default receive limit)."""

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Largest response message in bytes: the server's send limit and the clients' receive
limit."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
)
"""``grpc.aio.server`` options of these limits."""

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
)
"""Channel options of these limits, for the CLI, the SDK helpers and service-to-service
clients."""
