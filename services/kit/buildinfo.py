"""What build is running, for GetServiceInfo and the service.version resource attribute."""

from __future__ import annotations

import os
import time
from importlib import metadata

from google.protobuf.timestamp_pb2 import Timestamp

from toolmesh.common.v1 import common_pb2

_STARTED_AT = time.time()


def build_version() -> str:
    try:
        return metadata.version("toolmesh")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def service_info(service: str, contract_versions: list[str]) -> common_pb2.ServiceInfo:
    started = Timestamp()
    started.FromNanoseconds(int(_STARTED_AT * 1e9))
    return common_pb2.ServiceInfo(
        service=service,
        contract_versions=contract_versions,
        build_version=build_version(),
        build_revision=os.environ.get("TOOLMESH_BUILD_REVISION", ""),
        started_at=started,
    )
