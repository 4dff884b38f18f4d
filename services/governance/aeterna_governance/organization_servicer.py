"""gRPC servicer of ``aeterna.governance.v1.OrganizationService``."""

from __future__ import annotations

import grpc
from aeterna.governance.v1 import organization_service_pb2 as svc
from aeterna.governance.v1 import organization_service_pb2_grpc as svc_grpc

from aeterna_governance.deps import Deps, Registered, ServicerSpec

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["OrganizationService"].full_name


class OrganizationServicer(svc_grpc.OrganizationServiceServicer):
    """``OrganizationService``."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = OrganizationServicer(deps)
    svc_grpc.add_OrganizationServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer)


SPEC = ServicerSpec(SERVICE_NAME, _build)
