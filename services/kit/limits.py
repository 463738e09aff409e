"""Input limits shared by the services that store a value and the services that send it.

Telemetry refuses values over these limits; the gateway and auth clip what they send to them
(services.kit.audit), and the gateway's operator RPCs check them before asking telemetry. One
copy, so a sender can never build what the receiver refuses.
"""

from __future__ import annotations

# Identifiers, names and short texts (tenant, actor, request id, outcome, versions...).
MAX_KEY_CHARS = 256
# Free texts such as an audit event's target.
MAX_TEXT_CHARS = 4096
# An audit event's details, as a JSON object.
MAX_DETAILS_CHARS = 65536
# Contract versions named by one audit event.
MAX_CONTRACT_VERSIONS = 32
# Items in one RecordUsage or AppendAudit batch.
MAX_BATCH = 1000
# Far above any real amount, far below where integer micros could overflow 64 bits.
MAX_AMOUNT = 10**12
# Field violations listed in one INVALID_ARGUMENT answer; the rest are counted, not listed,
# so a request with thousands of bad items cannot grow the trailer past gRPC's metadata limit.
MAX_REPORTED_VIOLATIONS = 20
