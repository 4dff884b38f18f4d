from __future__ import annotations

import socket

import pytest
from aeterna_devstack.servers import free_port, scratch_dir
from aeterna_devstack.stack import DevStack


def test_a_failed_start_leaves_no_process_behind() -> None:
    # Memory refuses its settings and exits; governance, PostgreSQL and Redis had started
    # already. Left running, they would outlive the test session that tried the stack.
    stack = DevStack(
        replicas=1,
        governance_replicas=1,
        port=free_port(),
        root=scratch_dir("aeterna-test-stack-"),
        fresh=True,
        env={"AETERNA_MEMORY_CONSISTENCY_WAIT_S": "soon"},
    )
    with pytest.raises(RuntimeError, match="memory-0 did not become healthy"):
        stack.start(log=lambda *_: None)
    replicas = stack.all_replicas()
    assert [r.service for r in replicas] == ["memory", "governance"]
    assert all(r.proc is not None and r.proc.poll() is not None for r in replicas)
    # PostgreSQL and Redis were stopped too: their ports refuse connections.
    for server in (stack._pg, stack._redis):
        assert server is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
