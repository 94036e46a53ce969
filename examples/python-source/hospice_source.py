"""A hospice's nightly CSV export, served to a carerecord broker over the source protocol.

The hospice's system is not FHIR: once a night it writes a flat CSV file, one row per clinical
entry with the patient's demographics repeated on each row (`hospice_export.csv` is a sample).
This server reads that file and answers the broker's `carerecord.source.v1.SourceService` calls:

- `Fetch`: the patient's rows as typed entries plus demographics (`found`), `not_known` when the
  export does not hold the NHS number, or a typed `failure` when the export cannot be read.
- `Describe`: who this is and what it can return.

The rules it keeps (the broker checks them; `carerecord conformance --grpc URL` checks them before
go-live): UK dates (`14/10/2026`) are converted to ISO 8601; a row that cannot be read is left out
and said so (a warning and a shortfall), never sent half-understood; messages never carry NHS
numbers or names; the answer does not depend on who asks.

Run it (stubs are generated from the .proto files with grpcio-tools on first start):

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python hospice_source.py --export hospice_export.csv --listen 127.0.0.1:50061

and point a broker at it:

    [[sources]]
    id = "hospice"
    organisation_code = "NHOSP1"
    organisation_name = "St Elsewhere Hospice"
    timeout_ms = 1000
    [sources.grpc]
    url = "http://127.0.0.1:50061"
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import re
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
PROTOS = ["carerecord/v1/carerecord.proto", "carerecord/source/v1/source.proto"]

SNOMED = "http://snomed.info/sct"
ORGANISATION_CODE = "NHOSP1"
ORGANISATION_NAME = "St Elsewhere Hospice"

# The export's `kind` column -> (the CareRecord list it belongs to, the Section enum name).
KINDS = {
    "condition": ("conditions", "SECTION_CONDITIONS"),
    "medication": ("medications", "SECTION_MEDICATIONS"),
    "allergy": ("allergies", "SECTION_ALLERGIES"),
    "result": ("test_results", "SECTION_TEST_RESULTS"),
    "care_plan": ("care_plans", "SECTION_CARE_PLANS"),
    "document": ("documents", "SECTION_DOCUMENTS"),
    "encounter": ("encounters", "SECTION_ENCOUNTERS"),
    "appointment": ("appointments", "SECTION_APPOINTMENTS"),
}
COLUMNS = {
    "nhs_number", "family_name", "given_names", "birth_date", "gender", "kind", "code", "display",
    "date", "end_date", "status", "detail", "record_id", "last_updated",
}


def load_stubs(out_dir: str):
    """Generates Python stubs from the .proto files (grpcio-tools) into `out_dir` unless they are
    there, and imports them. Returns (carerecord_pb2, source_pb2, source_pb2_grpc)."""
    marker = os.path.join(out_dir, "carerecord", "source", "v1", "source_pb2_grpc.py")
    if not os.path.exists(marker):
        from grpc_tools import protoc

        os.makedirs(out_dir, exist_ok=True)
        rc = protoc.main(
            ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
        )
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc})")
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    return (
        importlib.import_module("carerecord.v1.carerecord_pb2"),
        importlib.import_module("carerecord.source.v1.source_pb2"),
        importlib.import_module("carerecord.source.v1.source_pb2_grpc"),
    )


# ---- the export ------------------------------------------------------------------------------

UK_DATE = re.compile(r"^(\d{2})/(\d{2})/(\d{4})$")
ISO_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


class Unreadable(ValueError):
    """A row that cannot be read; the message names the field, never its value."""


def iso_date(text: str, name: str) -> str:
    """`14/10/2026` -> `2026-10-14`; ISO 8601 (possibly partial) passes; empty stays empty."""
    text = text.strip()
    if not text:
        return ""
    m = UK_DATE.match(text)
    if m:
        day, month, year = m.groups()
        if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
            raise Unreadable(f"{name} is not a date")
        return f"{year}-{month}-{day}"
    if ISO_DATE.match(text):
        return text
    raise Unreadable(f"{name} is not a date")


@dataclass
class Patient:
    demographics: dict
    rows: list = field(default_factory=list)  # (list name, section name, entry fields)
    unreadable: list = field(default_factory=list)  # (section name or None, why)


class ExportError(Exception):
    """The export as a whole cannot be read (missing, wrong columns, not text)."""


def read_export(path: str) -> dict[str, Patient]:
    """The export, indexed by NHS number. Bad rows are kept as `unreadable` against their
    patient so the answer can say something is missing."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = COLUMNS - set(reader.fieldnames or [])
            if missing:
                raise ExportError(f"the export lacks columns: {', '.join(sorted(missing))}")
            patients: dict[str, Patient] = {}
            for row in reader:
                nhs = re.sub(r"[\s-]", "", row.get("nhs_number") or "")
                if not re.fullmatch(r"\d{10}", nhs):
                    continue  # not addressable by NHS number: no patient to attach it to
                patient = patients.get(nhs)
                if patient is None:
                    try:
                        birth = iso_date(row["birth_date"] or "", "birth_date")
                    except Unreadable:
                        birth = ""
                    patient = patients[nhs] = Patient(
                        demographics={
                            "nhs_number": nhs,
                            "family_name": (row["family_name"] or "").strip(),
                            "given_names": (row["given_names"] or "").split(),
                            "birth_date": birth,
                            "gender": (row["gender"] or "").strip().lower(),
                        }
                    )
                kind = (row["kind"] or "").strip()
                if kind not in KINDS:
                    patient.unreadable.append((None, "a row of an unknown kind"))
                    continue
                list_name, section = KINDS[kind]
                try:
                    entry = {
                        "code": (row["code"] or "").strip(),
                        "display": (row["display"] or "").strip(),
                        "effective": iso_date(row["date"] or "", "date"),
                        "ended": iso_date(row["end_date"] or "", "end_date"),
                        "status": (row["status"] or "").strip(),
                        "detail": (row["detail"] or "").strip(),
                        "record_id": (row["record_id"] or "").strip(),
                        "last_updated": (row["last_updated"] or "").strip(),
                    }
                    if not entry["display"] and not entry["code"]:
                        raise Unreadable("neither code nor display")
                except Unreadable as e:
                    patient.unreadable.append((section, f"a {kind.replace('_', ' ')} row: {e}"))
                    continue
                patient.rows.append((list_name, section, entry))
            return patients
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ExportError(f"the export could not be read ({type(e).__name__})") from e


class Export:
    """The export file, re-read when it changes (the nightly job replaces it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = None
        self._patients: dict[str, Patient] | None = None

    def patients(self) -> dict[str, Patient]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            raise ExportError("the export file is missing") from e
        with self._lock:
            if stamp != self._stamp:
                self._patients = None
                self._stamp = stamp
                self._patients = read_export(self.path)
            assert self._patients is not None
            return self._patients


# ---- the source protocol ---------------------------------------------------------------------


def make_servicer(export: Export, pb, spb, spb_grpc):
    """The SourceService implementation over `export` (a class built on the generated base)."""

    class HospiceSource(spb_grpc.SourceServiceServicer):
        def Fetch(self, request, context):
            try:
                patients = export.patients()
            except ExportError as e:
                kind = spb.FAILURE_KIND_UNAVAILABLE if "missing" in str(e) else spb.FAILURE_KIND_INVALID_DATA
                return spb.FetchResponse(failure=spb.Failure(kind=kind, message=str(e)))
            patient = patients.get(request.nhs_number)
            if patient is None:
                return spb.FetchResponse(not_known=spb.NotKnown())
            wanted = {pb.Section.Name(s) for s in request.sections} or {s for _, s in KINDS.values()}
            record = pb.CareRecord(patient=pb.Patient(**patient.demographics))
            for list_name, section, e in patient.rows:
                if section not in wanted:
                    continue
                getattr(record, list_name).append(
                    pb.Entry(
                        concept=pb.Coding(system=SNOMED, code=e["code"], display=e["display"]),
                        codings=[pb.Coding(system=SNOMED, code=e["code"], display=e["display"])],
                        summary=f"{e['display']} — {e['detail']}" if e["detail"] else e["display"],
                        status=e["status"],
                        effective=e["effective"],
                        ended=e["ended"],
                        provenance=[pb.Provenance(source_entry_id=e["record_id"], last_updated=e["last_updated"])],
                    )
                )
            found = spb.Found(record=record)
            for section, why in patient.unreadable:
                if section is None or section in wanted:
                    found.warnings.append(f"{ORGANISATION_NAME}: left out {why}")
                    found.shortfalls.append(
                        spb.Shortfall(
                            sections=[pb.Section.Value(section)] if section else [],
                            reason="a row of the hospice export could not be read",
                        )
                    )
            return spb.FetchResponse(found=found)

        def Describe(self, request, context):
            return spb.DescribeResponse(
                protocol="carerecord.source.v1",
                organisation_code=ORGANISATION_CODE,
                organisation_name=ORGANISATION_NAME,
                sections=[pb.Section.Value(s) for _, s in KINDS.values()],
                answers_depend_on_requester=False,
                software="hospice-csv-example 1.0",
            )

    return HospiceSource()


def serve(export_path: str, listen: str, stubs_dir: str, servicer_wrapper=None):
    """Starts a gRPC server for the export on `listen`; returns (server, port). `servicer_wrapper`
    lets a test wrap the servicer (to make it slow or misbehave) without changing this file."""
    import grpc

    pb, spb, spb_grpc = load_stubs(stubs_dir)
    servicer = make_servicer(Export(export_path), pb, spb, spb_grpc)
    if servicer_wrapper is not None:
        servicer = servicer_wrapper(servicer, pb, spb, spb_grpc)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    spb_grpc.add_SourceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    server.start()
    return server, port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default=os.path.join(HERE, "hospice_export.csv"), help="the CSV export")
    p.add_argument("--listen", default="127.0.0.1:50061", help="address to serve gRPC on (plaintext)")
    p.add_argument("--stubs", default=os.path.join(HERE, "gen"), help="where the generated stubs live")
    args = p.parse_args()
    server, port = serve(args.export, args.listen, args.stubs)
    host = args.listen.rsplit(":", 1)[0]
    print(f"serving carerecord.source.v1 on {host}:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
