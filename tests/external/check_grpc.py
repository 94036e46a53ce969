"""The broker from outside, as an integrator in another language sees it.

Python stubs are generated from proto/carerecord/v1/carerecord.proto with grpcio-tools (the
"client generated from our .proto in another language" check), then the running broker is
exercised over plaintext gRPC: health, reflection (v1alpha and v1), GetCareRecord,
StreamCareRecord, error codes, deadlines against a slowed organisation, and `lookup --json`.

Environment (set by run.sh): EXT_ROOT, EXT_BIN_DIR, EXT_BROKER_ADDR, EXT_BROKER_CONFIG,
EXT_ADMIN_URL, EXT_TMP, EXT_PATIENTS, EXT_ORGS.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Results,
    broker_config,
    env,
    grouped,
    nhs_invalid_variant,
    region_patients,
)

SERVICE = "carerecord.v1.CareRecordService"
R = Results("grpc")


def generate_stubs(root: str, out_dir: str):
    """protoc via grpcio-tools into out_dir; returns (pb2, pb2_grpc) modules."""
    from grpc_tools import protoc

    proto_root = os.path.join(root, "proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "carerecord/v1/carerecord.proto",
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}: {' '.join(args)}")
    sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("carerecord.v1.carerecord_pb2")
    pb2_grpc = importlib.import_module("carerecord.v1.carerecord_pb2_grpc")
    return pb2, pb2_grpc


class Ctx:
    pass


def code_of(err: grpc.RpcError):
    return err.code() if hasattr(err, "code") else None


def call_error(fn, *args, **kwargs):
    """Runs a call expected to fail; returns the RpcError (or raises AssertionError)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as e:
        return e
    raise AssertionError("call succeeded but an error status was expected")


# ---- health and reflection ----------------------------------------------------------------


def check_health(c: Ctx):
    stub = health_pb2_grpc.HealthStub(c.channel)
    for service in (SERVICE, ""):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        R.check(
            f"health {service or '(server)'!r} is SERVING",
            resp.status == health_pb2.HealthCheckResponse.SERVING,
            f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}",
        )
    err = call_error(
        stub.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5
    )
    R.check(
        "health of an unknown service is NOT_FOUND",
        err.code() == grpc.StatusCode.NOT_FOUND,
        f"got {err.code()}: {err.details()}",
    )


def check_reflection_v1alpha(c: Ctx):
    db = ProtoReflectionDescriptorDatabase(c.channel)
    services = list(db.get_services())
    for want in (SERVICE, "grpc.health.v1.Health"):
        R.check(
            f"reflection v1alpha lists {want}",
            want in services,
            f"services listed: {services}",
        )
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)
    methods = sorted(m.name for m in svc.methods)
    R.check(
        "reflection v1alpha: service descriptor has its three RPCs (GetCareRecord, GetDocument, StreamCareRecord)",
        methods == ["GetCareRecord", "GetDocument", "StreamCareRecord"],
        f"methods {methods}",
    )
    fd = pool.FindFileContainingSymbol(SERVICE)
    R.check(
        "reflection v1alpha: file descriptor for carerecord.v1 has GetCareRecordRequest",
        fd.package == "carerecord.v1" and "GetCareRecordRequest" in fd.message_types_by_name,
        f"file {fd.name} package {fd.package} messages {list(fd.message_types_by_name)}",
    )
    c.reflected_pool = pool


def reflection_v1_call(channel, request: reflection_pb2.ServerReflectionRequest):
    """grpcio-reflection's client only speaks v1alpha; grpc.reflection.v1 has the same messages
    on the wire, so a raw stream-stream call to the v1 method with v1alpha codecs is a v1 client."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter([request]), timeout=5))


def check_reflection_v1(c: Ctx):
    resp = reflection_v1_call(c.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    R.check("reflection v1 answers one response", len(resp) == 1, f"{len(resp)} responses")
    names = [s.name for s in resp[0].list_services_response.service]
    for want in (SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"):
        R.check(f"reflection v1 lists {want}", want in names, f"services listed: {names}")
    resp = reflection_v1_call(
        c.channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="carerecord.v1.GetCareRecordRequest"),
    )
    protos = resp[0].file_descriptor_response.file_descriptor_proto
    messages = []
    for raw in protos:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if fdp.package == "carerecord.v1":
            messages += [m.name for m in fdp.message_type]
    R.check(
        "reflection v1: file descriptor for carerecord.v1 has GetCareRecordRequest",
        "GetCareRecordRequest" in messages,
        f"error={resp[0].error_response.error_message!r} messages={messages}",
    )


def check_reflection_only_client(c: Ctx):
    """A generic tool with no .proto: build the request from reflected descriptors and call."""
    pool = c.reflected_pool
    req_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("carerecord.v1.GetCareRecordRequest"))
    resp_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("carerecord.v1.GetCareRecordResponse"))
    req = req_cls()
    req.nhs_number = c.patient.nhs
    req.requester.user_id = "reflection-user"
    req.requester.role_code = "R8000"
    req.requester.organisation_code = c.gp
    call = c.channel.unary_unary(
        f"/{SERVICE}/GetCareRecord",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    resp = call(req, timeout=5)
    R.check(
        "reflection-only client (no .proto) gets the record",
        resp.record.patient.nhs_number == c.patient.nhs and len(resp.sources) == len(c.sources),
        f"patient {resp.record.patient.nhs_number!r}, {len(resp.sources)} sources",
    )


# ---- lookups ------------------------------------------------------------------------------


def requester(c: Ctx, org: str | None = None, **kw):
    pb = c.pb
    return pb.Requester(
        user_id=kw.pop("user_id", "py-ehr-user-1"),
        user_name=kw.pop("user_name", "Dr Python Integrator"),
        role_code=kw.pop("role_code", "R8000"),
        organisation_code=org if org is not None else c.gp,
        **kw,
    )


def request(c: Ctx, nhs: str | None = None, **kw):
    return c.pb.GetCareRecordRequest(
        nhs_number=nhs if nhs is not None else c.patient.nhs,
        requester=kw.pop("requester", None) or requester(c),
        **kw,
    )


SECTIONS = [
    "conditions",
    "medications",
    "allergies",
    "test_results",
    "care_plans",
    "documents",
    "encounters",
    "appointments",
]


def outcome_name(c: Ctx, v: int) -> str:
    return c.pb.SourceOutcome.Name(v)


def verify_record(c: Ctx, resp, label: str):
    """The assertions every full answer for c.patient from c.gp must satisfy."""
    pb = c.pb
    ids = [s.source_id for s in resp.sources]
    want_ids = [s.id for s in c.sources]
    R.check(
        f"{label}: one status per configured source, in configuration order",
        ids == want_ids,
        f"got {ids}, configured {want_ids}",
    )
    ok = sorted(s.organisation_code for s in resp.sources if s.outcome == pb.SOURCE_OUTCOME_OK)
    R.check(
        f"{label}: OK sources are exactly the organisations that know the patient",
        ok == sorted(c.patient.orgs),
        f"OK {ok}, region says {sorted(c.patient.orgs)}; statuses "
        + ", ".join(f"{s.organisation_code}={outcome_name(c, s.outcome)}:{s.message}" for s in resp.sources),
    )
    others = [
        (s.organisation_code, outcome_name(c, s.outcome))
        for s in resp.sources
        if s.organisation_code not in c.patient.orgs and s.outcome != pb.SOURCE_OUTCOME_NOT_FOUND
    ]
    R.check(f"{label}: every other source is NOT_FOUND", not others, f"unexpected: {others}")
    R.check(f"{label}: complete is true", resp.complete, "complete=false")
    R.check(f"{label}: request_id is set", bool(resp.request_id), "empty request_id")
    try:
        datetime.fromisoformat(resp.assembled_at.replace("Z", "+00:00"))
        ok_time = resp.assembled_at.endswith("Z") or resp.assembled_at.endswith("+00:00")
    except ValueError:
        ok_time = False
    R.check(f"{label}: assembled_at is RFC 3339 UTC", ok_time, f"assembled_at={resp.assembled_at!r}")
    p = resp.record.patient
    R.check(
        f"{label}: demographics for the patient, with provenance",
        p.nhs_number == c.patient.nhs
        and p.birth_date == c.patient.birth_date
        and len(p.provenance) > 0
        and all(pv.organisation_code in c.patient.orgs for pv in p.provenance),
        f"patient nhs={p.nhs_number!r} dob={p.birth_date!r} (region {c.patient.birth_date}) "
        f"provenance={[pv.organisation_code for pv in p.provenance]}",
    )
    total = 0
    bad_prov = []
    unsorted = []
    for section in SECTIONS:
        entries = list(getattr(resp.record, section))
        total += len(entries)
        for e in entries:
            if not e.provenance or any(
                not pv.source_id or pv.organisation_code not in c.patient.orgs or not pv.source_entry_id
                for pv in e.provenance
            ):
                bad_prov.append(f"{section}: {e.summary!r} provenance={[(pv.source_id, pv.organisation_code, pv.source_entry_id) for pv in e.provenance]}")
        # The contract's order: not refuted before refuted, current medicines before past ones,
        # then most recent first (a medicine's latest issue when later; undated last).
        def group(e):
            refuted = e.verification_status == pb.VERIFICATION_STATUS_REFUTED
            past = section == "medications" and e.HasField("medication") and not e.medication.current
            return (refuted, past)

        def when(e):
            if section == "medications" and e.HasField("medication") and e.medication.latest_issue > e.effective:
                return e.medication.latest_issue
            return e.effective

        for a, b in zip(entries, entries[1:]):
            if group(a) != group(b):
                if group(a) > group(b):
                    unsorted.append(f"{section}: {a.summary!r} {group(a)} before {b.summary!r} {group(b)}")
                continue
            wa, wb = when(a), when(b)
            if not wa and wb:
                unsorted.append(f"{section}: undated {a.summary!r} before dated {b.summary!r}")
            elif wa and wb:
                n = min(len(wa), len(wb), 10)
                if wa[:n] < wb[:n]:
                    unsorted.append(f"{section}: {wa} before {wb}")
    R.check(f"{label}: the record has entries", total > 0, "no entries at all")
    R.check(
        f"{label}: every entry has provenance from an organisation that knows the patient",
        not bad_prov,
        "; ".join(bad_prov[:5]) + (f" (+{len(bad_prov) - 5} more)" if len(bad_prov) > 5 else ""),
        detail=f"{total} entries",
    )
    R.check(f"{label}: every section is most recent first", not unsorted, "; ".join(unsorted[:5]))
    contributed = sum(s.entries for s in resp.sources)
    provenances = sum(len(e.provenance) for sec in SECTIONS for e in getattr(resp.record, sec))
    R.check(
        f"{label}: per-source entry counts add up to the provenances in the merged record",
        contributed == provenances,
        f"sources say {contributed} entries, merged record carries {provenances} provenances",
    )
    return total


def check_get_care_record(c: Ctx):
    resp = c.stub.GetCareRecord(
        request(c, cache=c.pb.CACHE_DIRECTIVE_REQUIRE_FRESH), timeout=5
    )
    c.first = resp
    verify_record(c, resp, "GetCareRecord")
    R.check("GetCareRecord: fresh lookup is not from cache", not resp.from_cache, "from_cache=true")
    R.check("GetCareRecord: not emergency access", not resp.emergency_access, "emergency_access=true")

    again = c.stub.GetCareRecord(request(c), timeout=5)
    R.check(
        "GetCareRecord: a second lookup within the TTL is served from cache",
        again.from_cache and again.cache_age_ms < 60_000,
        f"from_cache={again.from_cache} cache_age_ms={again.cache_age_ms}",
    )
    R.check(
        "GetCareRecord: each request gets its own request_id",
        again.request_id and again.request_id != resp.request_id,
        f"{resp.request_id!r} then {again.request_id!r}",
    )

    for form in (grouped(c.patient.nhs), f"{c.patient.nhs[:3]}-{c.patient.nhs[3:6]}-{c.patient.nhs[6:]}"):
        r2 = c.stub.GetCareRecord(request(c, nhs=form), timeout=5)
        R.check(
            f"GetCareRecord: NHS number written {form!r} finds the same patient",
            r2.record.patient.nhs_number == c.patient.nhs
            and sorted(s.organisation_code for s in r2.sources if s.outcome == c.pb.SOURCE_OUTCOME_OK)
            == sorted(c.patient.orgs),
            f"patient {r2.record.patient.nhs_number!r}",
        )

    # A custom request id is honoured (documented in service.rs: x-request-id metadata).
    r3, call = c.stub.GetCareRecord.with_call(
        request(c), timeout=5, metadata=(("x-request-id", "ext-check-0001"),)
    )
    R.check(
        "GetCareRecord: a plain x-request-id from the caller is used as request_id",
        r3.request_id == "ext-check-0001",
        f"request_id={r3.request_id!r}",
    )

    # Sections filter: only the sections asked for come back.
    r4 = c.stub.GetCareRecord(request(c, sections=[c.pb.SECTION_ALLERGIES]), timeout=5)
    others = [s for s in SECTIONS if s != "allergies" and len(getattr(r4.record, s))]
    R.check(
        "GetCareRecord: sections=[ALLERGIES] returns no other section (demographics still present)",
        not others and r4.record.patient.nhs_number == c.patient.nhs,
        f"other sections present: {others}",
    )


def check_errors(c: Ctx):
    pb = c.pb
    bad = nhs_invalid_variant(c.patient.nhs)
    err = call_error(c.stub.GetCareRecord, request(c, nhs=bad), timeout=5)
    R.check(
        "invalid NHS number (bad check digit) -> INVALID_ARGUMENT mentioning the check digit",
        err.code() == grpc.StatusCode.INVALID_ARGUMENT and "check digit" in (err.details() or "").lower(),
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(c.stub.GetCareRecord, request(c, nhs="12345"), timeout=5)
    R.check(
        "NHS number of the wrong length -> INVALID_ARGUMENT",
        err.code() == grpc.StatusCode.INVALID_ARGUMENT,
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(
        c.stub.GetCareRecord, pb.GetCareRecordRequest(nhs_number=c.patient.nhs), timeout=5
    )
    R.check(
        "missing requester -> UNAUTHENTICATED",
        err.code() == grpc.StatusCode.UNAUTHENTICATED,
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(
        c.stub.GetCareRecord, request(c, requester=requester(c, role_code="")), timeout=5
    )
    R.check(
        "requester without a role -> UNAUTHENTICATED",
        err.code() == grpc.StatusCode.UNAUTHENTICATED,
        f"got {err.code()}: {err.details()!r}",
    )
    unrelated = c.unrelated_org
    err = call_error(c.stub.GetCareRecord, request(c, requester=requester(c, org=unrelated)), timeout=5)
    R.check(
        f"unrelated organisation ({unrelated}) -> PERMISSION_DENIED",
        err.code() == grpc.StatusCode.PERMISSION_DENIED,
        f"got {err.code()}: {err.details()!r}",
        detail=repr(err.details()),
    )
    err = call_error(c.stub.GetCareRecord, request(c, requester=requester(c, role_code="R9999")), timeout=5)
    R.check(
        "role not permitted (R9999) -> PERMISSION_DENIED",
        err.code() == grpc.StatusCode.PERMISSION_DENIED,
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(
        c.stub.GetCareRecord,
        request(c, requester=requester(c, org=unrelated, purpose=pb.PURPOSE_EMERGENCY_ACCESS)),
        timeout=5,
    )
    R.check(
        "emergency purpose without a reason -> INVALID_ARGUMENT",
        err.code() == grpc.StatusCode.INVALID_ARGUMENT,
        f"got {err.code()}: {err.details()!r}",
    )
    resp = c.stub.GetCareRecord(
        request(
            c,
            requester=requester(
                c,
                org=unrelated,
                purpose=pb.PURPOSE_EMERGENCY_ACCESS,
                emergency_reason="Unconscious in ED, external check",
            ),
        ),
        timeout=5,
    )
    R.check(
        "emergency purpose with a reason from an unrelated organisation -> OK, emergency_access=true",
        resp.emergency_access and resp.record.patient.nhs_number == c.patient.nhs,
        f"emergency_access={resp.emergency_access}",
    )
    err = call_error(c.stub.GetCareRecord, request(c, sections=[pb.SECTION_UNSPECIFIED]), timeout=5)
    R.check(
        "SECTION_UNSPECIFIED in sections -> INVALID_ARGUMENT",
        err.code() == grpc.StatusCode.INVALID_ARGUMENT,
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(c.stub.StreamCareRecord, request(c, nhs=bad), timeout=5)
    R.check(
        "StreamCareRecord with an invalid NHS number -> INVALID_ARGUMENT",
        err.code() == grpc.StatusCode.INVALID_ARGUMENT,
        f"got {err.code()}: {err.details()!r}",
    )
    err = call_error(c.stub.GetCareRecord, request(c, via_brokers=["carerecord"]), timeout=5)
    R.check(
        "via_brokers containing this broker's id (default 'carerecord') -> FAILED_PRECONDITION",
        err.code() == grpc.StatusCode.FAILED_PRECONDITION,
        f"got {err.code()}: {err.details()!r}",
    )


def check_stream(c: Ctx):
    pb = c.pb
    patient = c.stream_patient
    req = request(c, nhs=patient.nhs, requester=requester(c, org=patient.orgs[0]), cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH)
    events = list(c.stub.StreamCareRecord(req, timeout=5))
    kinds = [e.WhichOneof("event") for e in events]
    n_source = kinds.count("source")
    R.check(
        "StreamCareRecord: one source event per configured source, then exactly one final complete event",
        kinds == ["source"] * len(c.sources) + ["complete"],
        f"event kinds {kinds}",
        detail=f"{n_source} source events",
    )
    final = events[-1].complete if events and kinds[-1] == "complete" else None
    if final is None:
        R.fail("StreamCareRecord: final event", "no final complete event")
        return
    streamed = {e.source.status.source_id: e.source for e in events if e.WhichOneof("event") == "source"}
    R.check(
        "StreamCareRecord: source events cover every configured source once",
        sorted(streamed) == sorted(s.id for s in c.sources),
        f"streamed {sorted(streamed)}",
    )
    mismatched = [
        sid
        for sid, ev in streamed.items()
        if next((s for s in final.sources if s.source_id == sid), None) is None
        or next(s for s in final.sources if s.source_id == sid).outcome != ev.status.outcome
    ]
    R.check(
        "StreamCareRecord: each source event's outcome matches the final record's status",
        not mismatched,
        f"mismatched: {mismatched}",
    )
    contrib = [
        sid
        for sid, ev in streamed.items()
        if ev.status.outcome == pb.SOURCE_OUTCOME_OK
        and ev.contribution.patient.nhs_number != patient.nhs
    ]
    R.check(
        "StreamCareRecord: OK source events carry the source's view of the patient",
        not contrib,
        f"sources without the patient in their contribution: {contrib}",
    )
    ok = sorted(s.organisation_code for s in final.sources if s.outcome == pb.SOURCE_OUTCOME_OK)
    R.check(
        "StreamCareRecord: final event is the merged record (OK = organisations that know the patient)",
        ok == sorted(patient.orgs) and final.complete and final.record.patient.nhs_number == patient.nhs,
        f"OK {ok} vs {sorted(patient.orgs)}, complete={final.complete}",
    )
    # Cache hit: contract says source events are replayed before the final event.
    events2 = list(c.stub.StreamCareRecord(request(c, nhs=patient.nhs, requester=requester(c, org=patient.orgs[0])), timeout=5))
    kinds2 = [e.WhichOneof("event") for e in events2]
    R.check(
        "StreamCareRecord on a cache hit: source events replayed, then the final event (from_cache)",
        kinds2 == ["source"] * len(c.sources) + ["complete"] and events2[-1].complete.from_cache,
        f"kinds {kinds2}, from_cache={events2[-1].complete.from_cache if events2 else None}",
    )


def admin(c: Ctx, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{c.admin_url}{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def lookup_outcome(c: Ctx, req, timeout: float):
    """(description, response or None, error or None, elapsed seconds)."""
    t0 = time.monotonic()
    try:
        resp = c.stub.GetCareRecord(req, timeout=timeout)
    except grpc.RpcError as e:
        elapsed = time.monotonic() - t0
        return f"{e.code().name} after {elapsed * 1000:.0f} ms: {e.details()!r}", None, e, elapsed
    elapsed = time.monotonic() - t0
    statuses = {s.organisation_code: outcome_name(c, s.outcome).removeprefix("SOURCE_OUTCOME_") for s in resp.sources}
    return f"OK after {elapsed * 1000:.0f} ms, complete={resp.complete}, statuses {statuses}", resp, None, elapsed


def check_short_deadline(c: Ctx):
    pb = c.pb
    slow = c.slow_org
    observations = []
    got = admin(c, "PUT", f"/organisations/{slow}/latency", {"latency": "fixed:2000"})
    R.check(
        f"mock-sources admin: latency of {slow} set to fixed:2000",
        got and got.get("latency") == "fixed:2000",
        f"admin answered {got}",
    )
    try:
        # As the region starts (GP practices 25 ms a request): only an observation, since a
        # 50 ms deadline leaves 30 ms for sources and a GP read takes several requests.
        desc, *_ = lookup_outcome(c, request(c, cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH), 0.05)
        observations.append(f"50 ms, default latencies: {desc}")
        # Every other organisation instant, so only the slow one can miss the deadline.
        for s in c.sources:
            if s.organisation_code != slow:
                admin(c, "PUT", f"/organisations/{s.organisation_code}/latency", {"latency": "none"})
        # 50 ms as the brief asks; 300 ms if the broker cannot make 50 ms. Up to three tries
        # each: loopback timing on a shared 2-core CI machine has a tail.
        passed = None
        # Whether a 50 ms call was answered by its deadline at all: a partial record, or a typed
        # refusal (e.g. UNAVAILABLE: the requester's own GP, cut off by the deadline on a busy
        # machine, could not confirm the relationship) — never the client's DEADLINE_EXCEEDED.
        answered_50 = False
        for timeout in (0.05, 0.05, 0.05, 0.3, 0.3, 0.3):
            if passed is not None and passed <= timeout:
                break
            desc, resp, err, elapsed = lookup_outcome(c, request(c, cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH), timeout)
            observations.append(f"{int(timeout * 1000)} ms, others instant: {desc}")
            if timeout <= 0.05 and (
                resp is not None or (err is not None and err.code() != grpc.StatusCode.DEADLINE_EXCEEDED)
            ):
                answered_50 = True
            if resp is None:
                continue
            statuses = {s.organisation_code: s.outcome for s in resp.sources}
            if (
                # After repeated timeouts the slow org's circuit may open: also a partial answer.
                statuses.get(slow) in (pb.SOURCE_OUTCOME_TIMEOUT, pb.SOURCE_OUTCOME_CIRCUIT_OPEN)
                and statuses.get(c.gp) == pb.SOURCE_OUTCOME_OK
                and not resp.complete
                and len(resp.sources) == len(c.sources)
                and any(
                    slow.lower() in [sid.lower() for sid in w.source_ids]
                    for w in resp.warnings
                    if w.kind == pb.WARNING_KIND_INCOMPLETE
                )
            ):
                passed = timeout
            else:
                R.fail(f"short deadline ({int(timeout * 1000)} ms) with {slow} slow: partial record", desc)
                passed = -1
                break
        if passed != -1:
            R.check(
                f"short deadline: OK within the deadline, slow {slow} TIMEOUT (or CIRCUIT_OPEN), GP {c.gp} OK, complete=false, "
                "INCOMPLETE warning naming it",
                passed is not None,
                "; ".join(observations),
                detail=f"met at {int(passed * 1000)} ms" if passed else "",
            )
            R.check(
                "short deadline: a 50 ms deadline is answered by the broker, never left to expire (within 3 tries)",
                answered_50,
                "; ".join(o for o in observations if o.startswith("50 ms")),
                detail="partial record at 50 ms" if passed is not None and passed <= 0.05 else "typed refusal or partial record",
            )
    finally:
        admin(c, "POST", "/reset")
        print("  observed: " + "\n            ".join(observations), flush=True)

    # A deadline shorter than the merge headroom is refused outright.
    err = call_error(c.stub.GetCareRecord, request(c, cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH), timeout=0.005)
    R.check(
        "deadline below the merge headroom (5 ms) -> DEADLINE_EXCEEDED",
        err.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
        f"got {err.code()}: {err.details()!r}",
    )


def check_round_trip(c: Ctx):
    """A cached lookup is a memory read: its round trip on loopback should be a few ms. A steady
    ~40 ms is Nagle's algorithm meeting delayed ACKs (TCP_NODELAY not set on accepted sockets),
    which also eats the merge headroom and turns answers into DEADLINE_EXCEEDED."""
    import statistics

    req = request(c)
    c.stub.GetCareRecord(req, timeout=5)
    samples = []
    for _ in range(15):
        t0 = time.monotonic()
        c.stub.GetCareRecord(req, timeout=5)
        samples.append((time.monotonic() - t0) * 1000)
        time.sleep(0.01)
    med = statistics.median(samples)
    R.check(
        "cached GetCareRecord round trip on loopback is fast (median of 15 < 20 ms)",
        med < 20,
        f"median {med:.1f} ms, max {max(samples):.1f} ms — ~40 ms suggests TCP_NODELAY is not set on "
        "the broker's accepted sockets (tonic ignores Server::tcp_nodelay with serve_with_incoming*)",
        detail=f"median {med:.1f} ms",
    )


def check_timeouts_do_not_lock_out_the_gp(c: Ctx):
    """One EHR's very short deadline must not decide what the next caller gets: a lookup in which
    no source answered (every source TIMEOUT) is cached as a partial record, and the patient's own
    GP, asking next with a normal deadline, must still get the record."""
    pb = c.pb
    patient = c.lockout_patient
    gp = patient.orgs[0]
    first, *_ = lookup_outcome(
        c,
        request(c, nhs=patient.nhs, requester=requester(c, org=gp), cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH),
        0.035,
    )
    second, resp, err, _ = lookup_outcome(c, request(c, nhs=patient.nhs, requester=requester(c, org=gp)), 5)
    R.check(
        f"after a 35 ms lookup in which no source answered, the patient's GP ({gp}) with a 5 s deadline "
        "gets the record (not a refusal replayed from the cached all-TIMEOUT record)",
        resp is not None and resp.record.patient.nhs_number == patient.nhs,
        f"patient {patient.nhs}: first (35 ms, fresh) -> {first}; then (5 s, cache allowed) -> {second}",
        detail=second,
    )


def check_caller_deadlines_do_not_open_circuits(c: Ctx):
    """A source that times out only because a caller's deadline was short has done nothing wrong:
    a handful of impatient callers must not open every source's circuit for everyone else."""
    pb = c.pb
    patient = c.breaker_patient
    gp = patient.orgs[0]
    outcomes = []
    for _ in range(6):
        desc, *_ = lookup_outcome(
            c,
            request(c, nhs=patient.nhs, requester=requester(c, org=gp), cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH),
            0.03,
        )
        outcomes.append(desc.split(" after")[0])
    desc, resp, err, _ = lookup_outcome(
        c, request(c, requester=requester(c), cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH), 5
    )
    # Break-glass skips the relationship rule, so it shows every source's state.
    _, seen, _, _ = lookup_outcome(
        c,
        request(
            c,
            requester=requester(c, purpose=pb.PURPOSE_EMERGENCY_ACCESS, emergency_reason="external check: circuit states"),
            cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH,
        ),
        5,
    )
    opened = [
        s.organisation_code
        for s in (seen.sources if seen is not None else [])
        if s.outcome == pb.SOURCE_OUTCOME_CIRCUIT_OPEN and s.organisation_code != c.slow_org
    ]
    R.check(
        "six 30 ms-deadline lookups do not open the circuits of healthy sources for the next caller "
        "(5 s deadline, fresh)",
        resp is not None and not opened,
        f"30 ms lookups: {outcomes}; then: {desc}; circuits open: {opened}",
        detail=desc,
    )


def check_cli_json(c: Ctx):
    cmd = [
        os.path.join(c.bin_dir, "carerecord"),
        "lookup",
        c.patient.nhs,
        "--broker",
        f"http://{c.addr}",
        "--org",
        c.gp,
        "--json",
        "--fresh",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    R.check("carerecord lookup --json exits 0", p.returncode == 0, f"rc={p.returncode} stderr={p.stderr[-500:]!r}")
    try:
        doc = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        R.fail("carerecord lookup --json prints one JSON document", f"{e}: {p.stdout[:300]!r}")
        return
    R.ok("carerecord lookup --json prints one JSON document")
    R.check(
        "lookup --json --fresh has camelCase top-level keys requestId, sources, record, complete=true, assembledAt",
        all(k in doc for k in ("requestId", "sources", "record", "assembledAt")) and doc.get("complete") is True,
        f"keys {sorted(doc)}; complete={doc.get('complete')!r} (proto3 JSON omits false); "
        f"outcomes {[(x.get('sourceId'), x.get('outcome')) for x in doc.get('sources', [])]}",
    )
    snake = []

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                if "_" in k:
                    snake.append(f"{path}.{k}")
                walk(x, f"{path}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v[:3]):
                walk(x, f"{path}[{i}]")

    walk(doc, "$")
    R.check("lookup --json uses no snake_case keys anywhere", not snake, f"snake_case keys: {snake[:10]}")
    outcomes = {s.get("sourceId"): s.get("outcome") for s in doc.get("sources", [])}
    R.check(
        "lookup --json: enums by name and NHS number normalised",
        all(isinstance(o, str) and o.startswith("SOURCE_OUTCOME_") for o in outcomes.values())
        and doc.get("record", {}).get("patient", {}).get("nhsNumber") == c.patient.nhs,
        f"outcomes {outcomes}",
    )
    # The same JSON parses into the generated Python message (proto3 JSON mapping round trip).
    from google.protobuf import json_format

    msg = json_format.Parse(p.stdout, c.pb.GetCareRecordResponse())
    R.check(
        "lookup --json parses as a GetCareRecordResponse with Python's proto3 JSON parser",
        msg.record.patient.nhs_number == c.patient.nhs and len(msg.sources) == len(c.sources),
        f"parsed {len(msg.sources)} sources",
    )


def check_audit(c: Ctx):
    """The broker ran with CWD=$EXT_TMP, so the default audit file must be there, intact, and
    list this run's accesses (allowed, denied, break-glass) for the patient."""
    path = os.path.join(env("EXT_TMP"), "carerecord-audit.jsonl")
    R.check("audit trail written to the broker's CWD (default [audit] file)", os.path.exists(path), f"{path} missing")
    if not os.path.exists(path):
        return
    carerecord = os.path.join(c.bin_dir, "carerecord")
    p = subprocess.run([carerecord, "audit", "verify", path], capture_output=True, text=True, timeout=30)
    R.check("carerecord audit verify: hash chain intact", p.returncode == 0, f"rc={p.returncode} {p.stdout[-300:]!r} {p.stderr[-300:]!r}")
    p = subprocess.run(
        [carerecord, "audit", "patient", c.patient.nhs, "--file", path, "--json"],
        capture_output=True, text=True, timeout=30,
    )
    events = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    kinds = {e.get("kind") for e in events}
    R.check(
        "audit patient lists this run's access, denial and break-glass for the patient",
        p.returncode == 0 and {"access", "denied", "break_glass"} <= kinds
        and all(e.get("patient") == c.patient.nhs for e in events),
        f"rc={p.returncode} kinds={kinds} events={len(events)} stderr={p.stderr[-300:]!r}",
        detail=f"{len(events)} events",
    )
    clinical = [e for e in events if any(x in json.dumps(e) for x in (c.patient.name.split(",")[0].title(),))]
    R.check("audit events carry no patient name", not clinical, f"{len(clinical)} events mention the family name")


def check_python_client_example(c: Ctx):
    """examples/python-client/lookup.py, run as a user would, against the running broker."""
    example = os.path.join(c.root, "examples", "python-client", "lookup.py")
    sys.path.insert(0, os.path.dirname(example))
    lookup = importlib.import_module("lookup")
    R.check(
        "python client: affinity key is the broker's HMAC (same vector as affinity.rs)",
        lookup.affinity_key(b"key", "9434765919") == "2ce2f6cf75848afb7ed0e35345e511b8",
        lookup.affinity_key(b"key", "9434765919"),
    )
    out = subprocess.run(
        [sys.executable, example, c.patient.nhs, "--broker", c.addr, "--org", c.gp,
         "--affinity-secret", "region-secret"],
        capture_output=True, text=True, timeout=60,
    )
    if not R.check("python client: exits 0", out.returncode == 0, out.stderr[-1500:] or out.stdout):
        return
    answer = json.loads(out.stdout)
    R.check(
        "python client: every organisation that knows the patient answered OK",
        all(answer["sources"].get(o) == "SOURCE_OUTCOME_OK" for o in c.patient.orgs),
        str(answer["sources"]),
    )
    key = answer["affinity_key_sent"] or ""
    R.check(
        "python client: sent a keyed affinity header, never the NHS number",
        len(key) == 32 and c.patient.nhs not in key
        and key == lookup.affinity_key(b"region-secret", c.patient.nhs),
        key,
    )


def main() -> int:
    c = Ctx()
    c.root = env("EXT_ROOT")
    c.bin_dir = env("EXT_BIN_DIR")
    c.addr = env("EXT_BROKER_ADDR")
    c.admin_url = env("EXT_ADMIN_URL").rstrip("/")
    _, c.sources = broker_config(env("EXT_BROKER_CONFIG"))
    n_patients = int(os.environ.get("EXT_PATIENTS", "500"))
    n_orgs = int(os.environ.get("EXT_ORGS", "8"))

    gen = tempfile.mkdtemp(prefix="stubs-", dir=os.environ.get("EXT_TMP"))
    try:
        c.pb, c.pb_grpc = generate_stubs(c.root, gen)
        R.ok("python stubs generated from carerecord.proto with grpcio-tools")
    except Exception as e:  # noqa: BLE001
        R.fail("python stubs generated from carerecord.proto with grpcio-tools", str(e))
        return R.finish()

    patients = region_patients(c.bin_dir, n_patients, n_orgs, limit=50)
    configured = {s.organisation_code for s in c.sources}
    multi = [p for p in patients if len(p.orgs) >= 2 and not p.conflict and set(p.orgs) <= configured]
    if len(multi) < 4:
        R.fail("region has patients known to >= 2 organisations", f"only {len(multi)} in the first 50")
        return R.finish()
    c.patient = multi[0]
    c.stream_patient = multi[1]
    c.lockout_patient = multi[2]
    c.breaker_patient = multi[3]
    c.gp = c.patient.orgs[0]
    c.slow_org = c.patient.orgs[1]
    unrelated = [s.organisation_code for s in c.sources if s.organisation_code not in c.patient.orgs]
    c.unrelated_org = unrelated[0] if unrelated else "Z99999"
    print(
        f"  patient {c.patient.nhs} ({c.patient.name}) known to {c.patient.orgs}; GP {c.gp}; "
        f"stream patient {c.stream_patient.nhs}; slow org {c.slow_org}; unrelated org {c.unrelated_org}",
        flush=True,
    )

    c.channel = grpc.insecure_channel(c.addr)
    c.stub = c.pb_grpc.CareRecordServiceStub(c.channel)
    R.run("health", check_health, c)
    R.run("reflection v1alpha", check_reflection_v1alpha, c)
    R.run("reflection v1", check_reflection_v1, c)
    R.run("GetCareRecord", check_get_care_record, c)
    if getattr(c, "reflected_pool", None) is not None:
        R.run("reflection-only client", check_reflection_only_client, c)
    R.run("error codes", check_errors, c)
    R.run("StreamCareRecord", check_stream, c)
    R.run("lookup --json", check_cli_json, c)
    R.run("round trip", check_round_trip, c)
    R.run("python client example", check_python_client_example, c)
    # From here on sources time out on purpose (slow org, short deadlines); keep these last.
    R.run("short deadline", check_short_deadline, c)
    R.run("timeouts do not lock out the GP", check_timeouts_do_not_lock_out_the_gp, c)
    R.run("caller deadlines do not open circuits", check_caller_deadlines_do_not_open_circuits, c)
    R.run("audit trail", check_audit, c)
    c.channel.close()
    return R.finish()


if __name__ == "__main__":
    sys.exit(main())
