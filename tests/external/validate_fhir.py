"""Validates what the mock region serves against independent FHIR models.

For every organisation: `GET metadata`; for a few patients it knows, a Patient search by NHS
number, each clinical resource type's search (following `next` links), a read of one resource,
`Patient/{id}/$everything` and a batch POST. Every resource and Bundle is validated with
fhir.resources' R4B models (fhir.resources 8.x has no R4 package; R4B is R4 plus
backward-compatible additions, and none of the types served here changed incompatibly), and
the UK Core shapes the broker relies on are checked: Patient.identifier with system
https://fhir.nhs.uk/Id/nhs-number holding a valid Modulus 11 NHS number, meta.lastUpdated on
every resource, the UK Core profile in meta.profile, and references to the patient.

Environment (set by run.sh): EXT_BIN_DIR, EXT_BROKER_CONFIG, EXT_PATIENTS, EXT_ORGS.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict

from fhir.resources.R4B import get_fhir_model_class

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Results, broker_config, env, nhs_valid, region_patients  # noqa: E402

R = Results("fhir")
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
UK_CORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-"
CLINICAL = [
    "Condition",
    "AllergyIntolerance",
    "MedicationStatement",
    "MedicationRequest",
    "Observation",
    "DiagnosticReport",
    "CarePlan",
    "DocumentReference",
    "Encounter",
    "Appointment",
]
PATIENTS_PER_ORG = 3


class Problems:
    """Invalid resources, grouped by check so each check is one PASS/FAIL line."""

    def __init__(self) -> None:
        self.by_check: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, check: str, where: str, what: str) -> None:
        self.by_check[check].append(f"{where}: {what}")

    def seen(self, check: str, n: int = 1) -> None:
        self.counts[check] += n


P = Problems()


def fetch(url: str, body: dict | None = None) -> tuple[int, dict | None, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method="POST" if body is not None else "GET",
        headers={"accept": "application/fhir+json", "content-type": "application/fhir+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            raw = r.read()
            ctype = r.headers.get("content-type", "")
            return r.status, json.loads(raw), ctype
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), e.headers.get("content-type", "")
        except ValueError:
            return e.code, None, e.headers.get("content-type", "")


def validate(where: str, resource: dict) -> bool:
    """fhir.resources R4B model validation of one resource (Bundles validate their entries too)."""
    rt = resource.get("resourceType")
    P.seen("valid R4 (R4B models)")
    try:
        cls = get_fhir_model_class(rt)
    except Exception as e:  # noqa: BLE001
        P.add("valid R4 (R4B models)", where, f"unknown resourceType {rt!r}: {e}")
        return False
    try:
        cls.model_validate(resource)
    except Exception as e:  # noqa: BLE001 — pydantic ValidationError and friends
        msg = str(e).replace("\n", " | ")
        P.add("valid R4 (R4B models)", f"{where} {rt}/{resource.get('id')}", msg[:600])
        return False
    return True


def uk_core(where: str, resource: dict, patient_id: str | None = None, nhs: str | None = None) -> None:
    rt = resource.get("resourceType")
    rid = f"{where} {rt}/{resource.get('id')}"
    meta = resource.get("meta") or {}
    P.seen("meta.lastUpdated on every resource")
    if not meta.get("lastUpdated"):
        P.add("meta.lastUpdated on every resource", rid, "no meta.lastUpdated")
    if rt in CLINICAL or rt == "Patient":
        P.seen("UK Core profile in meta.profile")
        if f"{UK_CORE}{rt}" not in (meta.get("profile") or []):
            P.add("UK Core profile in meta.profile", rid, f"profile {meta.get('profile')}")
    if rt == "Patient":
        P.seen("Patient.identifier NHS number (system, Modulus 11)")
        ids = [i for i in resource.get("identifier", []) if i.get("system") == NHS_SYSTEM]
        if not ids:
            P.add("Patient.identifier NHS number (system, Modulus 11)", rid, "no identifier with the NHS number system")
        for i in ids:
            v = i.get("value", "")
            if not nhs_valid(v):
                P.add("Patient.identifier NHS number (system, Modulus 11)", rid, f"{v!r} is not a valid NHS number")
            elif nhs and v != nhs:
                P.add("Patient.identifier NHS number (system, Modulus 11)", rid, f"{v!r} but searched for {nhs}")
        gps = resource.get("generalPractitioner") or []
        for g in gps:
            ident = g.get("identifier") or {}
            P.seen("organisation references use the ODS system")
            if ident and ident.get("system") != ODS_SYSTEM:
                P.add("organisation references use the ODS system", rid, f"generalPractitioner {g}")
    if rt in CLINICAL and patient_id:
        P.seen("clinical resources reference the patient")
        ref_field = "patient" if rt == "AllergyIntolerance" else "subject"
        refs = []
        if rt == "Appointment":
            refs = [p.get("actor", {}).get("reference") for p in resource.get("participant", [])]
        else:
            refs = [(resource.get(ref_field) or {}).get("reference")]
        if f"Patient/{patient_id}" not in refs and not any(
            r and r.endswith(f"/Patient/{patient_id}") for r in refs
        ):
            P.add("clinical resources reference the patient", rid, f"references {refs}, patient is {patient_id}")


def bundle(where: str, b: dict | None, want_type: str, patient_id=None, nhs=None, matches_only=False) -> list[dict]:
    """Validates a Bundle and its entries; returns the entry resources (with `matches_only`,
    only those with search.mode match: `_include`d and referenced resources, such as the
    Medications `$everything` carries, are validated but not returned)."""
    if not isinstance(b, dict) or b.get("resourceType") != "Bundle":
        P.add("valid R4 (R4B models)", where, f"expected a Bundle, got {str(b)[:200]}")
        return []
    validate(where, b)
    P.seen(f"Bundle.type {want_type}")
    if b.get("type") != want_type:
        P.add(f"Bundle.type {want_type}", where, f"type {b.get('type')!r}")
    out = []
    for i, e in enumerate(b.get("entry") or []):
        res = e.get("resource")
        if res is None:
            continue
        if want_type == "searchset":
            P.seen("searchset entries have an absolute fullUrl ending in Type/id")
            full = e.get("fullUrl", "")
            if not full.startswith("http") or not full.endswith(f"{res.get('resourceType')}/{res.get('id')}"):
                P.add("searchset entries have an absolute fullUrl ending in Type/id", f"{where} entry {i}", f"fullUrl {full!r}")
        validate(f"{where} entry {i}", res)
        uk_core(f"{where} entry {i}", res, patient_id, nhs)
        if matches_only and (e.get("search") or {}).get("mode") == "include":
            continue
        out.append(res)
    return out


def search_all(where: str, url: str, patient_id=None, nhs=None) -> list[dict]:
    """A search and every page after it; checks Bundle.total against what the pages hold."""
    resources: list[dict] = []
    total = None
    pages = 0
    while url and pages < 50:
        status, b, ctype = fetch(url)
        P.seen("searches answer 200 with application/fhir+json")
        if status != 200 or "fhir+json" not in ctype:
            P.add("searches answer 200 with application/fhir+json", where, f"{url} -> {status} {ctype}")
            return resources
        # Bundle.total counts matches; includes ride with the page that references them.
        resources += bundle(f"{where} page {pages}", b, "searchset", patient_id, nhs, matches_only=True)
        if total is None:
            total = b.get("total")
        nxt = [l.get("url") for l in b.get("link", []) if l.get("relation") == "next"]
        url = nxt[0] if nxt else None
        pages += 1
    P.seen("Bundle.total equals the entries over every page")
    if total is not None and total != len(resources):
        P.add("Bundle.total equals the entries over every page", where, f"total {total}, pages held {len(resources)}")
    return resources


def check_org(org: str, base: str, patients) -> dict:
    stats = {"resources": 0}
    status, cap, ctype = fetch(f"{base}/metadata")
    P.seen("metadata is a CapabilityStatement")
    if status != 200 or not cap or cap.get("resourceType") != "CapabilityStatement":
        P.add("metadata is a CapabilityStatement", org, f"{status} {str(cap)[:200]}")
    else:
        validate(f"{org} metadata", cap)
        P.seen("CapabilityStatement says fhirVersion 4.0.x")
        if not str(cap.get("fhirVersion", "")).startswith("4.0"):
            P.add("CapabilityStatement says fhirVersion 4.0.x", org, f"fhirVersion {cap.get('fhirVersion')!r}")
        types = {r.get("type") for rest in cap.get("rest", []) for r in rest.get("resource", [])}
        P.seen("CapabilityStatement lists every served type")
        missing = {"Patient", *CLINICAL} - types
        if missing:
            P.add("CapabilityStatement lists every served type", org, f"missing {sorted(missing)}")

    for p in patients:
        where = f"{org} {p.nhs}"
        q = urllib.parse.urlencode({"identifier": f"{NHS_SYSTEM}|{p.nhs}"})
        found = search_all(f"{where} Patient?identifier", f"{base}/Patient?{q}", nhs=p.nhs)
        P.seen("Patient search by NHS number finds exactly one patient")
        if len(found) != 1:
            P.add("Patient search by NHS number finds exactly one patient", where, f"{len(found)} found")
            continue
        pat = found[0]
        pid = pat["id"]
        P.seen("Patient birthDate matches the region")
        if pat.get("birthDate") != p.birth_date and not p.conflict:
            P.add("Patient birthDate matches the region", where, f"{pat.get('birthDate')} vs {p.birth_date}")
        stats["resources"] += 1
        by_type = {}
        for rt in CLINICAL:
            q = urllib.parse.urlencode({"patient": pid, "_count": 5})
            got = search_all(f"{where} {rt}?patient", f"{base}/{rt}?{q}", patient_id=pid)
            by_type[rt] = got
            stats["resources"] += len(got)
            wrong = [r.get("resourceType") for r in got if r.get("resourceType") != rt]
            P.seen("searches return only the type asked for")
            if wrong:
                P.add("searches return only the type asked for", f"{where} {rt}", f"got {wrong[:5]}")
        # A read of one resource returns the same resource the search did.
        some = next((r for rs in by_type.values() for r in rs), None)
        if some:
            status, res, _ = fetch(f"{base}/{some['resourceType']}/{urllib.parse.quote(some['id'])}")
            P.seen("read returns the resource the search returned")
            if status != 200 or res != some:
                P.add("read returns the resource the search returned", where, f"{some['resourceType']}/{some['id']} -> {status}")
            elif res:
                validate(f"{where} read", res)
        # $everything: the patient and all their clinical resources.
        ev = search_all(f"{where} $everything", f"{base}/Patient/{urllib.parse.quote(pid)}/$everything", patient_id=pid)
        ev_ids = {(r["resourceType"], r["id"]) for r in ev}
        searched = {(r["resourceType"], r["id"]) for rs in by_type.values() for r in rs}
        P.seen("$everything holds the patient and every resource the searches found")
        if ("Patient", pid) not in ev_ids or not searched <= ev_ids:
            P.add(
                "$everything holds the patient and every resource the searches found",
                where,
                f"missing {sorted(searched - ev_ids)[:5]}; patient present={('Patient', pid) in ev_ids}",
            )
        # Batch: one GET per type, plus one entry that must fail on its own.
        entries = [{"request": {"method": "GET", "url": f"{rt}?patient={pid}&_count=100"}} for rt in CLINICAL]
        entries.append({"request": {"method": "GET", "url": "Medication?code=x"}})
        status, resp, _ = fetch(f"{base}", {"resourceType": "Bundle", "type": "batch", "entry": entries})
        P.seen("batch POST answers 200 with a batch-response of one entry per request")
        if status != 200 or not resp or len(resp.get("entry", [])) != len(entries):
            P.add(
                "batch POST answers 200 with a batch-response of one entry per request",
                where,
                f"{status} {len((resp or {}).get('entry', []))} entries",
            )
            continue
        bundle(f"{where} batch", resp, "batch-response")
        for i, (rt, e) in enumerate(zip(CLINICAL, resp["entry"])):
            inner = e.get("resource") or {}
            got = bundle(f"{where} batch[{i}] {rt}", inner, "searchset", pid)
            P.seen("batch entries agree with the searches")
            if {r["id"] for r in got} != {r["id"] for r in by_type[rt]}:
                P.add("batch entries agree with the searches", f"{where} {rt}", f"batch {len(got)} vs search {len(by_type[rt])}")
        last = resp["entry"][-1]
        P.seen("a failing batch entry has a 4xx status and an OperationOutcome")
        outcome = (last.get("response") or {}).get("outcome")
        if not str((last.get("response") or {}).get("status", "")).startswith("4") or not outcome:
            P.add("a failing batch entry has a 4xx status and an OperationOutcome", where, json.dumps(last)[:300])
        else:
            validate(f"{where} batch error outcome", outcome)
    return stats


def admin_call(url: str, method: str, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as r:
        return r.status


def check_modes(admin: str, sources) -> dict:
    """The shapes the clinical-safety modes serve are valid R4 too: conflict data mode (the
    disagreeing organisation's record of listed patients) and `ignore_include` (searches without
    included Medications, then `GET Medication/{id}`)."""
    bases = {s.organisation_code: s.base_url.rstrip("/") for s in sources}
    _, listed, _ = fetch(f"{admin}/conflicts?limit=6")
    stats = {"resources": 0}
    try:
        admin_call(f"{admin}/organisations/all/data", "PUT", {"data": "conflicts"})
        for row in listed or []:
            nhs = row["nhs_number"]
            for org in {row["conflict"]["gp"], row["conflict"]["organisation"]}:
                base = bases.get(org)
                if not base:
                    continue
                q = urllib.parse.urlencode({"identifier": f"{NHS_SYSTEM}|{nhs}"})
                found = search_all(f"conflicts {org} {nhs} Patient", f"{base}/Patient?{q}", nhs=nhs)
                if len(found) != 1:
                    continue
                pid = found[0]["id"]
                got = search_all(f"conflicts {org} {nhs} $everything", f"{base}/Patient/{pid}/$everything", patient_id=pid)
                stats["resources"] += len(got)
        first = sources[0].organisation_code
        admin_call(f"{admin}/organisations/{first}/fault", "PUT", {"fault": "ignore_include"})
        base = bases[first]
        # Any patient of this organisation with prescriptions: from the conflict list or the crawl.
        for row in listed or []:
            if first not in row["organisations"]:
                continue
            q = urllib.parse.urlencode({"identifier": f"{NHS_SYSTEM}|{row['nhs_number']}"})
            found = search_all(f"ignore_include {first} Patient", f"{base}/Patient?{q}")
            if len(found) != 1:
                continue
            pid = found[0]["id"]
            q = urllib.parse.urlencode({"patient": pid, "_include": "MedicationRequest:medication"})
            mrs = search_all(f"ignore_include {first} MedicationRequest", f"{base}/MedicationRequest?{q}", patient_id=pid)
            for mr in mrs:
                ref = (mr.get("medicationReference") or {}).get("reference", "")
                P.seen("ignore_include: medicationReference to Medication/{id}, readable by id")
                status, med, _ = fetch(f"{base}/{ref}")
                if not ref.startswith("Medication/") or status != 200 or not med:
                    P.add("ignore_include: medicationReference to Medication/{id}, readable by id", first, f"{ref} -> {status}")
                    continue
                validate(f"ignore_include {first} {ref}", med)
                uk_core(f"ignore_include {first}", med)
                stats["resources"] += 1
    finally:
        admin_call(f"{admin}/reset", "POST")
    return stats


def main() -> int:
    _, sources = broker_config(env("EXT_BROKER_CONFIG"))
    patients = region_patients(
        env("EXT_BIN_DIR"), int(os.environ.get("EXT_PATIENTS", "500")), int(os.environ.get("EXT_ORGS", "8")), limit=200
    )
    print("  models: fhir.resources.R4B (fhir.resources 8.x has no R4 package)", flush=True)
    # The validator must be able to fail: a deliberately broken Patient is rejected.
    broken = {
        "resourceType": "Patient",
        "id": "broken",
        "gender": "bogus",
        "birthDate": "14/03/1970",
        "notAnElement": True,
    }
    probe = Problems()
    global P
    real, P = P, probe
    accepted = validate("self-test", broken)
    P = real
    R.check(
        "self-test: the R4B validator rejects a Patient with a bad gender, date and unknown element",
        not accepted,
        "the broken Patient validated: the validator is not checking anything",
        detail=(probe.by_check.get("valid R4 (R4B models)") or [""])[0][:160],
    )
    total = 0
    for s in sources:
        known = [p for p in patients if s.organisation_code in p.orgs][:PATIENTS_PER_ORG]
        if not known:
            R.fail(f"{s.organisation_code}: has patients to check", "none of the first 200 patients is known here")
            continue
        stats = R.run(f"{s.organisation_code} crawl", check_org, s.organisation_code, s.base_url.rstrip("/"), known)
        if stats:
            total += stats["resources"]
            print(f"  {s.organisation_code}: {len(known)} patients, {stats['resources']} resources", flush=True)

    # Error responses are OperationOutcomes too.
    base = sources[0].base_url.rstrip("/")
    status, oo, _ = fetch(f"{base}/Condition")
    R.check(
        "a bad search (no patient) is 400 with a valid OperationOutcome",
        status == 400 and isinstance(oo, dict) and oo.get("resourceType") == "OperationOutcome" and validate("bad search", oo),
        f"{status} {str(oo)[:200]}",
    )
    status, oo, _ = fetch(f"{base}/Patient/no-such-id/$everything")
    R.check(
        "$everything for an unknown patient is 404 with a valid OperationOutcome",
        status == 404 and isinstance(oo, dict) and oo.get("resourceType") == "OperationOutcome" and validate("unknown everything", oo),
        f"{status} {str(oo)[:200]}",
    )

    admin = os.environ.get("EXT_ADMIN_URL")
    if admin:
        R.run("clinical-safety modes crawl", check_modes, admin.rstrip("/"), sources)

    for check in sorted(P.counts):
        problems = P.by_check.get(check, [])
        if problems:
            listing = "\n      ".join(problems[:25])
            more = f"\n      (+{len(problems) - 25} more)" if len(problems) > 25 else ""
            R.fail(f"{check} ({P.counts[check]} checked)", f"{len(problems)} invalid:\n      {listing}{more}")
        else:
            R.ok(f"{check}", f"{P.counts[check]} checked")
    R.check("resources were crawled", total > 0, "no resources at all", detail=f"{total} resources")
    return R.finish()


if __name__ == "__main__":
    sys.exit(main())
