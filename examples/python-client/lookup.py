#!/usr/bin/env python3
"""An EHR's side of carerecord, in Python: look a patient up over gRPC.

Stubs are generated at start from the broker's own contract (proto/carerecord/v1/carerecord.proto)
with grpcio-tools, so nothing generated is committed. The call carries what a region's load
balancer and tracing expect of every client:

- `x-carerecord-affinity`: HMAC-SHA256 of the NHS number under the region's affinity secret,
  first 128 bits as hex — the key nginx hashes on to keep a patient on one broker. Never the NHS
  number itself.
- `traceparent`: the W3C trace context, so the broker's spans join the EHR's trace.
- a deadline (`grpc-timeout`), and TLS / mutual TLS when a CA or client certificate is given.

    pip install grpcio grpcio-tools
    python3 lookup.py 9434765919 --broker 127.0.0.1:50051 --org A81001 \\
        --affinity-secret "$CARERECORD_AFFINITY_SECRET"
    python3 lookup.py 9434765919 --broker carerecord.region.example:443 \\
        --ca region-ca.pem --cert epr.pem --key epr.key --org RJ122

Prints one JSON object: which broker answered (request id), each organisation's status and the
number of entries per section.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import json
import os
import secrets
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
AFFINITY_HEADER = "x-carerecord-affinity"


def affinity_key(secret: bytes, nhs_number: str) -> str:
    """The patient-affinity key: the same function as broker/src/affinity.rs."""
    digits = "".join(ch for ch in nhs_number if ch.isdigit())
    return hmac.new(secret, digits.encode(), hashlib.sha256).hexdigest()[:32]


def new_traceparent() -> str:
    """A fresh W3C trace context (an EHR with its own tracing passes its current one)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def stubs():
    """(pb2, pb2_grpc) generated from the contract into a temporary directory."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="carerecord-stubs-")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "carerecord/v1/carerecord.proto",
        ]
    )
    if rc != 0:
        raise SystemExit(f"grpcio-tools could not compile the contract (exit {rc})")
    sys.path.insert(0, out)
    return (
        importlib.import_module("carerecord.v1.carerecord_pb2"),
        importlib.import_module("carerecord.v1.carerecord_pb2_grpc"),
    )


def channel(args) -> grpc.Channel:
    if not (args.ca or args.cert):
        return grpc.insecure_channel(args.broker)
    read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    options = [("grpc.ssl_target_name_override", args.tls_domain)] if args.tls_domain else []
    return grpc.secure_channel(args.broker, credentials, options=options)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("nhs_number")
    p.add_argument("--broker", default=os.environ.get("CARERECORD_BROKER", "127.0.0.1:50051"))
    p.add_argument("--user", default="py-ehr-user")
    p.add_argument("--role", default="R8000")
    p.add_argument("--org", required=True, help="the requester's organisation (ODS code)")
    p.add_argument("--affinity-secret", default=os.environ.get("CARERECORD_AFFINITY_SECRET"))
    p.add_argument("--traceparent", help="the EHR's W3C trace context (default: a new trace)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline, seconds")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--tls-domain")
    args = p.parse_args()

    pb, pb_grpc = stubs()
    metadata = [("traceparent", args.traceparent or new_traceparent())]
    if args.affinity_secret:
        metadata.append((AFFINITY_HEADER, affinity_key(args.affinity_secret.encode(), args.nhs_number)))
    request = pb.GetCareRecordRequest(
        nhs_number=args.nhs_number,
        requester=pb.Requester(user_id=args.user, role_code=args.role, organisation_code=args.org),
    )
    stub = pb_grpc.CareRecordServiceStub(channel(args))
    try:
        r = stub.GetCareRecord(request, timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "message": e.details()}))
        return 1
    outcome = pb.SourceOutcome.Name
    print(
        json.dumps(
            {
                "request_id": r.request_id,
                "complete": r.complete,
                "from_cache": r.from_cache,
                "sources": {s.organisation_code: outcome(s.outcome) for s in r.sources},
                "entries": {
                    field.name: len(value)
                    for field, value in r.record.ListFields()
                    if hasattr(value, "__len__") and not isinstance(value, (str, bytes))
                },
                "affinity_key_sent": dict(metadata).get(AFFINITY_HEADER),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
