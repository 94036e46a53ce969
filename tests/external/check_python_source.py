"""The Python example source (examples/python-source, a hospice's CSV export served over the
source protocol) behind a real broker, as an organisation joining without a fork would run it.

Stubs are generated from the .proto files with grpcio-tools. This script starts, on loopback:
the example server over its sample export; the same example slowed beyond its deadline, over an
export that cannot be read, answering about another patient, sending malformed entries; and a
server answering Fetch with bytes that are not protobuf. A `carerecord serve` (the real binary)
is configured with one `[sources.grpc]` per server, and looked up over gRPC:
- served: the hospice's entries and demographics in the record (OK);
- not known: NOT_FOUND for a patient the export does not hold;
- slow: TIMEOUT; unreadable export: ERROR; another patient's demographics: WRONG_PATIENT and
  nothing of it used; malformed entries and non-protobuf bytes: ERROR — and the broker still up;
- `carerecord conformance --grpc` passes against the example and fails against the garbage.

Environment (set by run.sh): EXT_ROOT, EXT_BIN_DIR, EXT_TMP, EXT_PIDS_FILE.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Results, env, toml_table  # noqa: E402

R = Results("python-source")
KNOWN = "9990000018"  # in the sample export: care plan, medicine, allergy, encounter
UNKNOWN = "9990000026"  # not in it
SOMEONE_ELSE = "9990000034"  # in it too: the liar answers with this patient's demographics


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wrap_slow(servicer, pb, spb, spb_grpc):
    class Slow(spb_grpc.SourceServiceServicer):
        def Fetch(self, request, context):
            time.sleep(5)
            return servicer.Fetch(request, context)

    return Slow()


def wrap_liar(servicer, pb, spb, spb_grpc):
    class Liar(spb_grpc.SourceServiceServicer):
        def Fetch(self, request, context):
            answer = servicer.Fetch(request, context)
            if answer.HasField("found"):
                answer.found.record.patient.nhs_number = SOMEONE_ELSE
            return answer

    return Liar()


def wrap_malformed(servicer, pb, spb, spb_grpc):
    class Malformed(spb_grpc.SourceServiceServicer):
        def Fetch(self, request, context):
            answer = servicer.Fetch(request, context)
            if answer.HasField("found"):
                for entry in answer.found.record.care_plans:
                    entry.effective = "the first of October"
            return answer

    return Malformed()


def garbage_server(port: int):
    """Answers Fetch with bytes that are not a FetchResponse (no serializer: raw bytes)."""
    from concurrent import futures

    handler = grpc.method_handlers_generic_handler(
        "carerecord.source.v1.SourceService",
        {
            "Fetch": grpc.unary_unary_rpc_method_handler(
                lambda request, context: b"\xff\xff\xff\xffCONFORMANCE-RAW-BODY not protobuf",
                request_deserializer=None,
                response_serializer=None,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def main() -> int:
    root, tmp = env("EXT_ROOT"), env("EXT_TMP")
    work = os.path.join(tmp, "python-source")
    os.makedirs(work, exist_ok=True)
    example_dir = os.path.join(root, "examples", "python-source")
    sys.path.insert(0, example_dir)
    example = importlib.import_module("hospice_source")
    stubs = os.path.join(work, "gen")
    pb, spb, _ = example.load_stubs(stubs)
    R.ok("stubs generated from carerecord/source/v1/source.proto with grpcio-tools")

    export = os.path.join(example_dir, "hospice_export.csv")
    broken_export = os.path.join(work, "broken_export.csv")
    with open(broken_export, "wb") as fh:
        fh.write(b"\x00\x01 this is not the export \xff\xfe\n")

    servers = []
    sources = []  # (id, code, url, timeout_ms)

    def start(sid, code, export_path, wrapper=None, timeout_ms=2000):
        server, port = example.serve(export_path, "127.0.0.1:0", stubs, wrapper)
        servers.append(server)
        sources.append((sid, code, f"http://127.0.0.1:{port}", timeout_ms))

    start("hospice", "NHOSP1", export)
    start("slow", "NHOSP2", export, wrap_slow, timeout_ms=400)
    start("unreadable", "NHOSP3", broken_export)
    start("liar", "NHOSP4", export, wrap_liar)
    start("malformed", "NHOSP5", export, wrap_malformed)
    gport = free_port()
    servers.append(garbage_server(gport))
    sources.append(("garbage", "NHOSP6", f"http://127.0.0.1:{gport}", 2000))

    try:
        return run_broker(root, work, sources, pb)
    finally:
        for s in servers:
            s.stop(grace=None)


def run_broker(root: str, work: str, sources, pb) -> int:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    text = toml_table("server", {"listen": addr, "plaintext": True, "broker_id": "python-source"})
    text += toml_table("access", {"trust_unverified_assertions": True})
    text += toml_table("audit", {"file": os.path.join(work, "audit.jsonl")})
    for sid, code, url, timeout_ms in sources:
        text += "\n" + toml_table(
            "[sources]",
            {"id": sid, "organisation_code": code, "organisation_name": f"Hospice {code}", "timeout_ms": timeout_ms},
        )
        text += toml_table("sources.grpc", {"url": url})
    conf = os.path.join(work, "broker.toml")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(text)
    carerecord = os.path.join(env("EXT_BIN_DIR"), "carerecord")
    p = subprocess.run([carerecord, "check-config", conf], capture_output=True, text=True, timeout=30)
    if not R.check("carerecord check-config accepts [sources.grpc]", p.returncode == 0, f"{p.stdout} {p.stderr}"):
        return R.finish()

    log = open(os.path.join(work, "broker.log"), "wb")
    proc = subprocess.Popen([carerecord, "serve", "--config", conf], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    pids = os.environ.get("EXT_PIDS_FILE")
    if pids:
        with open(pids, "a") as fh:
            fh.write(f"{proc.pid}\n")
    try:
        return checks(root, addr, proc, sources, pb)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def checks(root: str, addr: str, proc, sources, pb) -> int:
    # The broker's own contract, for the lookups (generated beside the source protocol's).
    pb_grpc = importlib.import_module("carerecord.v1.carerecord_pb2_grpc")
    channel = grpc.insecure_channel(addr)
    deadline = time.monotonic() + 30
    serving = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="carerecord.v1.CareRecordService"), timeout=1
            )
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                serving = True
                break
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    if not R.check("broker with six [sources.grpc] SERVING", serving, f"exit={proc.poll()}"):
        return R.finish()
    stub = pb_grpc.CareRecordServiceStub(channel)

    def lookup(nhs):
        return stub.GetCareRecord(
            pb.GetCareRecordRequest(
                nhs_number=nhs,
                requester=pb.Requester(
                    user_id="py-clinician",
                    role_code="R8000",
                    organisation_code="A81001",
                    asserted_relationship="hospice referral",
                ),
                cache=pb.CACHE_DIRECTIVE_REQUIRE_FRESH,
            ),
            timeout=5,
        )

    def outcome(response, sid):
        status = next(s for s in response.sources if s.source_id == sid)
        return pb.SourceOutcome.Name(status.outcome), status.message

    r = lookup(KNOWN)

    def served():
        got, message = outcome(r, "hospice")
        assert got == "SOURCE_OUTCOME_OK", f"{got}: {message}"
        plans = [e for e in r.record.care_plans if any(p.source_id == "hospice" for p in e.provenance)]
        assert len(plans) == 1, f"care plans from the hospice: {len(plans)}"
        assert plans[0].effective == "2026-10-01", f"UK date converted: {plans[0].effective!r}"
        assert plans[0].provenance[0].source_entry_id == "CP-1001"
        assert r.record.patient.birth_date == "1978-12-18", r.record.patient.birth_date
        meds = [e for e in r.record.medications if any(p.source_id == "hospice" for p in e.provenance)]
        assert len(meds) == 1
        R.ok("served: the export's entries and demographics in the record (OK)")

    def slow():
        got, message = outcome(r, "slow")
        assert got == "SOURCE_OUTCOME_TIMEOUT", f"{got}: {message}"
        R.ok("slow -> TIMEOUT, and the lookup still answered")

    def unreadable():
        got, message = outcome(r, "unreadable")
        assert got == "SOURCE_OUTCOME_ERROR", f"{got}: {message}"
        assert "export" in message, message
        R.ok("an export that cannot be read -> ERROR", message)

    def wrong_patient():
        got, message = outcome(r, "liar")
        assert got == "SOURCE_OUTCOME_WRONG_PATIENT", f"{got}: {message}"
        for section in (r.record.care_plans, r.record.medications, r.record.allergies, r.record.encounters):
            for e in section:
                assert all(p.source_id != "liar" for p in e.provenance), "an entry of the liar was used"
        R.ok("another patient's demographics -> WRONG_PATIENT, nothing of it used")

    def malformed():
        got, message = outcome(r, "malformed")
        assert got == "SOURCE_OUTCOME_ERROR", f"{got}: {message}"
        assert "ISO 8601" in message, message
        R.ok("malformed entries -> ERROR", message)

    def garbage():
        got, message = outcome(r, "garbage")
        assert got == "SOURCE_OUTCOME_ERROR", f"{got}: {message}"
        assert "CONFORMANCE-RAW-BODY" not in message, message
        R.ok("bytes that are not protobuf -> ERROR, not echoed", message)

    def not_known():
        u = lookup(UNKNOWN)
        got, message = outcome(u, "hospice")
        assert got == "SOURCE_OUTCOME_NOT_FOUND", f"{got}: {message}"
        R.ok("a patient the export does not hold -> NOT_FOUND")

    for name, fn in [
        ("served", served),
        ("slow", slow),
        ("unreadable", unreadable),
        ("wrong patient", wrong_patient),
        ("malformed", malformed),
        ("garbage", garbage),
        ("not known", not_known),
    ]:
        R.run(name, fn)

    carerecord = os.path.join(env("EXT_BIN_DIR"), "carerecord")
    hospice_url = next(url for sid, _, url, _ in sources if sid == "hospice")
    garbage_url = next(url for sid, _, url, _ in sources if sid == "garbage")

    def conformance_passes():
        p = subprocess.run(
            [carerecord, "conformance", "--grpc", hospice_url, "--known", KNOWN, "--organisation-code", "NHOSP1"],
            capture_output=True, text=True, timeout=120,
        )
        assert p.returncode == 0, f"exit {p.returncode}:\n{p.stdout}\n{p.stderr}"
        assert "READY" in p.stdout, p.stdout
        R.ok("carerecord conformance --grpc passes the Python example")

    def conformance_fails():
        p = subprocess.run(
            [carerecord, "conformance", "--grpc", garbage_url, "--known", KNOWN],
            capture_output=True, text=True, timeout=120,
        )
        assert p.returncode != 0, p.stdout
        assert "FAIL  a known patient is found" in p.stdout, p.stdout
        R.ok("carerecord conformance --grpc fails the garbage server, exit non-zero")

    R.run("conformance passes", conformance_passes)
    R.run("conformance fails", conformance_fails)
    R.check("the broker is still running", proc.poll() is None, f"exit={proc.poll()}")
    return R.finish()


if __name__ == "__main__":
    sys.exit(main())
