"""gRPC servicer of ``aeterna.governance.v1.ApprovalService``."""

from __future__ import annotations

import grpc
from aeterna.governance.v1 import approval_service_pb2 as svc
from aeterna.governance.v1 import approval_service_pb2_grpc as svc_grpc

from aeterna_governance.deps import Deps, Registered, ServicerSpec

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["ApprovalService"].full_name


class ApprovalServicer(svc_grpc.ApprovalServiceServicer):
    """``ApprovalService``."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = ApprovalServicer(deps)
    svc_grpc.add_ApprovalServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer)


SPEC = ServicerSpec(SERVICE_NAME, _build)
