"""The broker's FHIR R4 face from outside, as a FHIR client in another language sees it.

Tokens are signed here, in Python, with `cryptography` (ES256: a JOSE header, the claims, and the
raw r||s signature, base64url without padding), using the private half of the key run.sh made
with `carerecord token new-key` — so the token format is checked independently of the Rust
signer. Then, over plaintext HTTP on loopback:

- `GET metadata` and `POST Patient/$getstructuredrecord` for patients the region knows to
  several organisations: every resource in each Bundle and the Bundle itself validated with
  fhir.resources' R4B models (as validate_fhir.py does), the shape the face promises (Patient,
  one List per section, meta.source, Organizations, Provenance) and no source URL anywhere;
- the same read again with SMART on FHIR's `fhirclient` (an independent client with R4 4.0.1
  models that parse strictly): its FHIRServer reads the CapabilityStatement, posts a Parameters
  built with its own models, and parses the Bundle and the OperationOutcomes;
- every way in that must be refused, each with its HTTP status and stable reason code;
- a document through the broker (`GET Binary/{id}`), and a forged id;
- a partial answer: one of the patient's organisations hung, the Bundle still 200 with an
  OperationOutcome issue naming it.

Environment (set by run.sh): EXT_BIN_DIR, EXT_BROKER_CONFIG, EXT_ADMIN_URL, EXT_PATIENTS,
EXT_ORGS, EXT_FHIR_BASE, EXT_FHIR_TOKEN_KEY.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fhir.resources.R4B import get_fhir_model_class
from fhirclient import client as fc_client
from fhirclient import server as fc_server
from fhirclient.models import binary as fc_binary
from fhirclient.models import bundle as fc_bundle
from fhirclient.models import identifier as fc_identifier
from fhirclient.models import operationoutcome as fc_operationoutcome
from fhirclient.models import parameters as fc_parameters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Results,
    broker_config,
    env,
    nhs_check_digit,
    nhs_invalid_variant,
    region_patients,
)

R = Results("fhir-face")
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
FHIR_JSON = "application/fhir+json"
CLINICAL = {
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
}
SECTIONS = 8  # conditions, medications, allergies, test_results, care_plans, documents, encounters, appointments


class Ctx:
    pass


# ---- tokens, signed here -------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sign_es256(key: ec.EllipticCurvePrivateKey, claims: dict, header: dict | None = None) -> str:
    """A JWS compact serialisation: ES256 over `header.claims`, signature r||s (32 bytes each)."""
    header = header if header is not None else {"alg": "ES256", "typ": "JWT"}
    signing_input = f"{b64url(compact(header))}.{b64url(compact(claims))}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def claims(c: Ctx, **changes) -> dict:
    now = int(time.time())
    out = {
        "iss": "unverified",
        "aud": c.audience,
        "iat": now,
        "exp": now + 120,
        "sub": "py-fhir-user-1",
        "name": "Dr Python FHIR",
        "role": "R8000",
        "organisation": c.gp,
        "purpose": "direct_care",
    }
    out.update(changes)
    return out


def token(c: Ctx, **changes) -> str:
    return sign_es256(c.key, claims(c, **changes))


# ---- HTTP ----------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers, raw: bytes) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()} if headers is not None else {}
        self.raw = raw
        try:
            self.body = json.loads(raw) if raw else None
        except ValueError:
            self.body = None

    def reason(self) -> str:
        try:
            return self.body["issue"][0]["details"]["coding"][0]["code"]
        except (KeyError, IndexError, TypeError):
            return ""

    def __str__(self) -> str:
        text = self.raw[:400].decode("utf-8", "replace")
        return f"HTTP {self.status} {self.headers.get('content-type', '')}: {text}"


def http(c: Ctx, method: str, path: str, body: dict | None = None, bearer: str | None = None,
         accept: str = FHIR_JSON, fresh: bool = False, timeout: float = 20) -> Answer:
    headers = {"accept": accept}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = FHIR_JSON
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    if fresh:
        headers["cache-control"] = "no-cache"
    req = urllib.request.Request(urllib.parse.urljoin(c.base, path), data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.headers, e.read())


def parameters(nhs: str, *more: dict) -> dict:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patientNHSNumber", "valueIdentifier": {"system": NHS_SYSTEM, "value": nhs}},
            *more,
        ],
    }


def structured_record(c: Ctx, nhs: str, bearer: str | None, *more: dict, fresh: bool = False, timeout: float = 20) -> Answer:
    return http(c, "POST", "Patient/$getstructuredrecord", parameters(nhs, *more), bearer, fresh=fresh, timeout=timeout)


def admin(c: Ctx, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{c.admin_url}{path}", data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


# ---- validation ----------------------------------------------------------------------------


def r4b_problems(resource: dict) -> list[str]:
    """fhir.resources R4B validation of one resource; [] when valid."""
    rt = resource.get("resourceType")
    try:
        cls = get_fhir_model_class(rt)
        cls.model_validate(resource)
    except Exception as e:  # noqa: BLE001 — pydantic ValidationError, unknown type, ...
        return [f"{rt}/{resource.get('id')}: {str(e).replace(chr(10), ' | ')[:500]}"]
    return []


def bundle_resources(bundle: dict) -> list[dict]:
    return [e.get("resource") or {} for e in bundle.get("entry") or []]


def validate_bundle(where: str, bundle: dict) -> None:
    """Every resource, then the Bundle, with R4B models: one PASS/FAIL line."""
    problems = []
    resources = bundle_resources(bundle)
    for r in resources:
        problems += r4b_problems(r)
    problems += [f"the Bundle itself: {p}" for p in r4b_problems(bundle)]
    types = Counter(r.get("resourceType") for r in resources)
    R.check(
        f"{where}: every resource ({len(resources)}) and the Bundle valid R4 (fhir.resources R4B models)",
        not problems,
        "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""),
        detail=", ".join(f"{n} {t}" for t, n in sorted(types.items())),
    )


def fhirclient_parse(model, json_dict: dict) -> tuple[object | None, str]:
    """Strict parse with fhirclient's R4 models: (instance, '') or (None, why)."""
    try:
        return model(json_dict, strict=True), ""
    except Exception as e:  # noqa: BLE001 — FHIRValidationError and friends
        return None, f"{type(e).__name__}: {str(e)[:600]}"


def source_urls(config: dict) -> set[str]:
    """Every base_url in the broker config (sources, locators), and its scheme://host:port."""
    found: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "base_url" and isinstance(x, str) and x:
                    found.add(x.rstrip("/"))
                    parts = urllib.parse.urlsplit(x)
                    found.add(parts.netloc)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(config)
    return found


# ---- checks --------------------------------------------------------------------------------


def wait_for_face(c: Ctx) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            a = http(c, "GET", "metadata", timeout=2)
            if a.status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def check_metadata(c: Ctx):
    a = http(c, "GET", "metadata")
    R.check("GET metadata -> 200 application/fhir+json", a.status == 200 and a.headers.get("content-type", "").startswith(FHIR_JSON), str(a))
    cs = a.body or {}
    problems = r4b_problems(cs)
    R.check("CapabilityStatement valid R4 (fhir.resources R4B model)", not problems and cs.get("resourceType") == "CapabilityStatement", "; ".join(problems) or str(a))
    ops = [
        o.get("name")
        for r in (cs.get("rest") or [{}])[0].get("resource", [])
        for o in r.get("operation", [])
    ]
    R.check(
        "CapabilityStatement: fhirVersion 4.0.1, implementation.url is the base, getstructuredrecord on Patient",
        cs.get("fhirVersion") == "4.0.1"
        and (cs.get("implementation") or {}).get("url") == c.base
        and "getstructuredrecord" in ops,
        f"fhirVersion {cs.get('fhirVersion')!r}, implementation {cs.get('implementation')}, operations {ops}",
    )


def check_fhirclient_metadata(c: Ctx):
    """fhirclient's own server object fetches and parses `metadata` (strict R4 models)."""
    smart = fc_client.FHIRClient(
        settings={"app_id": "carerecord-external-check", "api_base": c.base}, save_func=lambda _state: None
    )
    cs = smart.server.capabilityStatement  # GET metadata, CapabilityStatement.read_from
    resources = [r.type for r in cs.rest[0].resource]
    ops = [o.name for r in cs.rest[0].resource for o in (r.operation or [])]
    R.check(
        "fhirclient FHIRServer reads metadata: CapabilityStatement parses with its R4 models",
        cs.fhirVersion == "4.0.1" and "Patient" in resources and "getstructuredrecord" in ops,
        f"fhirVersion {cs.fhirVersion}, resources {resources}, operations {ops}",
        detail=f"fhirclient {fc_client.__version__}: kind={cs.kind}, resources {resources}, operations {ops}",
    )
    c.smart = smart


def check_bundle_shape(c: Ctx, where: str, bundle: dict, nhs: str) -> None:
    resources = bundle_resources(bundle)
    by_type: dict[str, list[dict]] = {}
    for r in resources:
        by_type.setdefault(r.get("resourceType"), []).append(r)
    patients = by_type.get("Patient", [])
    nhs_ids = [
        i.get("value") for p in patients for i in p.get("identifier", []) if i.get("system") == NHS_SYSTEM
    ]
    R.check(
        f"{where}: a collection Bundle with one Patient carrying the NHS number asked for",
        bundle.get("type") == "collection" and len(patients) == 1 and nhs_ids == [nhs],
        f"type {bundle.get('type')!r}, {len(patients)} Patient(s), NHS identifiers {nhs_ids}",
    )
    lists = by_type.get("List", [])
    bad_lists = [
        l.get("title") for l in lists if not l.get("entry") and not (l.get("emptyReason") or {}).get("coding")
    ]
    R.check(
        f"{where}: one List per section ({SECTIONS}), each with entries or an emptyReason",
        len(lists) == SECTIONS and not bad_lists,
        f"{len(lists)} Lists {[l.get('title') for l in lists]}; without entries or emptyReason: {bad_lists}",
        detail=", ".join(f"{l.get('title')}: {len(l.get('entry') or [])}" for l in lists),
    )
    clinical = [r for r in resources if r.get("resourceType") in CLINICAL]
    unsourced = [f"{r['resourceType']}/{r.get('id')}" for r in clinical if not (r.get("meta") or {}).get("source")]
    sources = Counter((r.get("meta") or {}).get("source") for r in clinical)
    R.check(
        f"{where}: every clinical resource ({len(clinical)}) has meta.source; several organisations reported",
        clinical and not unsourced and len(sources) >= 2,
        f"without meta.source: {unsourced[:5]}; sources {dict(sources)}",
        detail=f"{len(sources)} sources",
    )
    # References resolve inside the Bundle (FHIR's rule: an absolute reference names a fullUrl; a
    # relative `Type/id` one resolves against the base to a fullUrl): every List item,
    # meta.source and every other `reference` anywhere.
    full_urls = {e.get("fullUrl") for e in bundle.get("entry") or []}
    refs: list[str] = []

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "reference" and isinstance(x, str):
                    refs.append(x)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(resources)
    refs += list(sources)
    dangling = sorted({r for r in refs if r not in full_urls and urllib.parse.urljoin(c.base, r) not in full_urls})
    R.check(
        f"{where}: every reference ({len(refs)}: List items, meta.source, subjects, ...) resolves to an entry of the Bundle",
        not dangling,
        f"unresolved: {dangling[:5]}; fullUrls look like {sorted(u for u in full_urls if u)[:2]}",
    )
    R.check(
        f"{where}: Organizations and a Provenance for the sources",
        len(by_type.get("Organization", [])) >= 2 and len(by_type.get("Provenance", [])) >= 1,
        f"{len(by_type.get('Organization', []))} Organization, {len(by_type.get('Provenance', []))} Provenance",
    )


def check_no_source_url(c: Ctx, where: str, raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    leaked = sorted(u for u in c.source_urls if u in text)
    R.check(
        f"{where}: no source organisation's URL anywhere in the Bundle JSON ({len(c.source_urls)} URLs and host:ports checked)",
        not leaked,
        f"leaked: {leaked}",
    )


def check_structured_record(c: Ctx):
    a = structured_record(c, c.patient.nhs, token(c), fresh=True)
    where = f"$getstructuredrecord {c.patient.nhs} (known to {','.join(c.patient.orgs)})"
    ok = R.check(
        f"{where} -> 200 Bundle, application/fhir+json, Cache-Control no-store",
        a.status == 200
        and (a.body or {}).get("resourceType") == "Bundle"
        and a.headers.get("content-type", "").startswith(FHIR_JSON)
        and a.headers.get("cache-control") == "no-store",
        str(a),
    )
    if not ok:
        return
    c.bundle = a.body
    validate_bundle(where, a.body)
    check_bundle_shape(c, where, a.body, c.patient.nhs)
    check_no_source_url(c, where, a.raw)
    outcomes = [r for r in bundle_resources(a.body) if r.get("resourceType") == "OperationOutcome"]
    R.check(
        f"{where}: every organisation answered, so no OperationOutcome issue names a source",
        not any(
            i.get("severity") in ("warning", "error") for o in outcomes for i in o.get("issue", [])
        ),
        json.dumps(outcomes)[:600],
    )

    # A few sections only.
    a = structured_record(
        c,
        c.patient.nhs,
        token(c),
        {"name": "includeAllergies", "part": [{"name": "includeResolvedAllergies", "valueBoolean": True}]},
        {"name": "includeSection", "valueCode": "conditions"},
    )
    titles = sorted(r.get("title") for r in bundle_resources(a.body or {}) if r.get("resourceType") == "List")
    R.check(
        "includeAllergies + includeSection conditions -> 200 with exactly two Lists",
        a.status == 200 and len(titles) == 2,
        f"{a.status}: Lists {titles}",
        detail=f"Lists {titles}",
    )
    if a.status == 200:
        validate_bundle("two-section Bundle", a.body)

    # Several more patients, each known to several organisations.
    for p in c.more_patients:
        a = structured_record(c, p.nhs, token(c, organisation=p.orgs[0]))
        where = f"$getstructuredrecord {p.nhs} (known to {','.join(p.orgs)})"
        if R.check(f"{where} -> 200", a.status == 200, str(a)):
            validate_bundle(where, a.body)
            check_no_source_url(c, where, a.raw)


def check_fhirclient_bundle(c: Ctx):
    """fhirclient posts a Parameters it built and parses the Bundle with its strict R4 models."""
    smart = c.smart
    nhs_id = fc_identifier.Identifier({"system": NHS_SYSTEM, "value": c.patient.nhs})
    param = fc_parameters.ParametersParameter({"name": "patientNHSNumber"})
    param.valueIdentifier = nhs_id
    params = fc_parameters.Parameters()
    params.parameter = [param]
    smart.server.session.headers["Authorization"] = f"Bearer {token(c)}"
    try:
        res = smart.server.post_json("Patient/$getstructuredrecord", params.as_json())
    finally:
        smart.server.session.headers.pop("Authorization", None)
    bundle, why = fhirclient_parse(fc_bundle.Bundle, res.json())
    if not R.check("fhirclient: POST $getstructuredrecord (its own Parameters) -> Bundle parses strictly with R4 4.0.1 models", bundle is not None, why):
        return
    types = Counter(e.resource.resource_type for e in bundle.entry or [])
    classes_match = all(type(e.resource).__name__ == e.resource.resource_type for e in bundle.entry or [])
    patients = [e.resource for e in bundle.entry if e.resource.resource_type == "Patient"]
    nhs = [i.value for p in patients for i in p.identifier or [] if i.system == NHS_SYSTEM]
    # This read may come from the broker's cache (an OperationOutcome then says so): compare
    # everything else with the fresh read made with urllib.
    mine = Counter({t: n for t, n in types.items() if t != "OperationOutcome"})
    fresh = Counter(r.get("resourceType") for r in bundle_resources(c.bundle) if r.get("resourceType") != "OperationOutcome")
    R.check(
        "fhirclient: every entry resolves to its own R4 class; one Patient with the NHS number; "
        "the same resources as the fresh read with urllib",
        classes_match and nhs == [c.patient.nhs] and mine == fresh,
        f"fhirclient {dict(types)}, NHS {nhs}; urllib {dict(fresh)}",
        detail=", ".join(f"{n} {t}" for t, n in sorted(types.items())),
    )
    # Round trip: fhirclient serialises what it parsed; fhir.resources accepts that too.
    again = bundle.as_json()
    problems = r4b_problems(again)
    R.check("fhirclient's re-serialised Bundle is valid for fhir.resources R4B too", not problems, "; ".join(problems))

    # A refusal through fhirclient: its own exception, carrying the OperationOutcome.
    try:
        smart.server.post_json("Patient/$getstructuredrecord", params.as_json())
        R.fail("fhirclient: no token -> FHIRUnauthorizedException", "the POST succeeded")
    except fc_server.FHIRUnauthorizedException as e:
        oo, why = fhirclient_parse(fc_operationoutcome.OperationOutcome, e.response.json())
        code = oo.issue[0].details.coding[0].code if oo is not None else None
        R.check("fhirclient: no token -> FHIRUnauthorizedException with an OperationOutcome (TOKEN_MISSING)", code == "TOKEN_MISSING", why or f"code {code}")


def unknown_nhs_number(c: Ctx) -> str:
    known = {p.nhs for p in c.all_patients}
    for n in range(400_000_000, 400_100_000, 7):
        first9 = f"{n:09d}"
        d = nhs_check_digit(first9)
        if d is not None and first9 + str(d) not in known:
            return first9 + str(d)
    raise RuntimeError("no unknown NHS number found")


def check_errors(c: Ctx):
    other_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    good_body = (c.patient.nhs,)
    cases = [
        ("no token", good_body, None, 401, "TOKEN_MISSING"),
        ("a token signed by another key", good_body, sign_es256(other_key, claims(c)), 401, "TOKEN_INVALID"),
        ("an expired token", good_body, token(c, iat=now - 600, exp=now - 300), 401, "TOKEN_EXPIRED"),
        ("a token for another audience", good_body, token(c, aud="https://another.example/fhir"), 401, "TOKEN_INVALID"),
        ("a token living longer than 300 s", good_body, token(c, exp=now + 900), 401, "TOKEN_INVALID"),
        (
            "an unsigned token (alg none)",
            good_body,
            f"{b64url(compact({'alg': 'none', 'typ': 'JWT'}))}.{b64url(compact(claims(c)))}.",
            401,
            "TOKEN_INVALID",
        ),
        ("an invalid NHS number (wrong check digit)", (nhs_invalid_variant(c.patient.nhs),), token(c), 400, "INVALID_NHS_NUMBER"),
        ("a role that may not view records (R9999)", good_body, token(c, role="R9999"), 403, "ROLE_NOT_PERMITTED"),
        # Without trusted relationship assertions (the mock region's config), an organisation with
        # no record of the patient is refused the same way whether anyone knows the patient or not
        # (no existence oracle); under emergency access nobody knowing is a 404.
        (
            f"a known patient, asked by an organisation without a record ({c.unrelated_org})",
            good_body,
            token(c, organisation=c.unrelated_org),
            403,
            "NO_LEGITIMATE_RELATIONSHIP",
        ),
        ("a valid NHS number no organisation knows (direct care)", (c.unknown_nhs,), token(c), 403, "NO_LEGITIMATE_RELATIONSHIP"),
        (
            "a valid NHS number no organisation knows (emergency access with a reason)",
            (c.unknown_nhs,),
            token(c, purpose="emergency_access", emergency_reason="external check: unknown patient"),
            404,
            "PATIENT_NOT_FOUND",
        ),
        ("emergency access without a reason", good_body, token(c, purpose="emergency_access"), 400, "EMERGENCY_REASON_MISSING"),
        (
            "an unknown section",
            (c.patient.nhs, {"name": "includeSection", "valueCode": "horoscope"}),
            token(c),
            400,
            "UNKNOWN_SECTION",
        ),
    ]
    for what, (nhs, *more), bearer, status, reason in cases:
        a = structured_record(c, nhs, bearer, *more)
        ok = (
            a.status == status
            and (a.body or {}).get("resourceType") == "OperationOutcome"
            and a.reason() == reason
            and a.headers.get("content-type", "").startswith(FHIR_JSON)
        )
        if status == 401:
            ok = ok and a.headers.get("www-authenticate", "").startswith("Bearer")
        R.check(f"{what} -> {status} {reason}" + (" with WWW-Authenticate: Bearer" if status == 401 else ""), ok, str(a))
        c.outcomes.append((what, a.body))


def check_cli_token(c: Ctx):
    """The product's signer and this one agree: a token from `carerecord token sign` is accepted."""
    p = subprocess.run(
        [
            os.path.join(c.bin_dir, "carerecord"), "token", "sign", "--key", c.key_path,
            "--audience", c.audience, "--user", "cli-user", "--role", "R8000", "--org", c.gp,
        ],
        capture_output=True, text=True, timeout=30,
    )
    jwt = p.stdout.strip()
    header = json.loads(base64.urlsafe_b64decode(jwt.split(".")[0] + "==")) if jwt.count(".") == 2 else {}
    a = structured_record(c, c.patient.nhs, jwt)
    R.check(
        "a token from `carerecord token sign` (same key) is accepted too; its header is ES256/JWT",
        p.returncode == 0 and a.status == 200 and header.get("alg") == "ES256",
        f"rc {p.returncode} {p.stderr[-300:]!r}; header {header}; {a}",
    )


def check_outcomes(c: Ctx):
    """Every OperationOutcome the face returned for an error: R4B model and fhirclient model."""
    problems = []
    for what, body in c.outcomes:
        if not isinstance(body, dict):
            problems.append(f"{what}: no JSON body")
            continue
        problems += [f"{what}: {p}" for p in r4b_problems(body)]
        _, why = fhirclient_parse(fc_operationoutcome.OperationOutcome, body)
        if why:
            problems.append(f"{what}: fhirclient: {why}")
    R.check(
        f"every error OperationOutcome ({len(c.outcomes)}) valid for fhir.resources R4B and fhirclient R4",
        c.outcomes and not problems,
        "; ".join(problems[:5]),
    )


def document_url(bundle: dict) -> str | None:
    for r in bundle_resources(bundle):
        if r.get("resourceType") != "DocumentReference":
            continue
        url = (((r.get("content") or [{}])[0]).get("attachment") or {}).get("url", "")
        if url.startswith("Binary/"):
            return url
    return None


def check_documents(c: Ctx):
    url, who = None, None
    seen = []
    for p in [c.patient, *c.more_patients, *c.doc_candidates]:
        b = c.bundle if p is c.patient else structured_record(c, p.nhs, token(c, organisation=p.orgs[0])).body
        seen.append(p.nhs)
        url = document_url(b or {})
        if url:
            who = p
            break
    if not R.check("a DocumentReference whose attachment.url is broker-relative (Binary/...)", url is not None, f"none in the Bundles of {seen}", detail=f"{url} for {who.nhs if who else ''}"):
        return
    bearer = token(c, organisation=who.orgs[0])
    a = http(c, "GET", url, bearer=bearer, accept="*/*")
    R.check(
        f"GET {url} with the token -> 200 and a non-empty body",
        a.status == 200 and len(a.raw) > 0,
        str(a),
        detail=f"{len(a.raw)} bytes of {a.headers.get('content-type')}",
    )
    a = http(c, "GET", url, bearer=bearer, accept=FHIR_JSON)
    binary = a.body or {}
    # The id separately: FHIR ids are [A-Za-z0-9\-\.]{1,64}, a rule of its own.
    problems = r4b_problems({k: v for k, v in binary.items() if k != "id"}) if binary else ["no JSON"]
    _, why = fhirclient_parse(fc_binary.Binary, binary)
    R.check(
        f"GET {url} accepting only application/fhir+json -> a Binary with data, valid for "
        "fhir.resources R4B (id aside) and fhirclient R4",
        a.status == 200 and binary.get("resourceType") == "Binary" and bool(binary.get("data")) and not problems and not why,
        f"{a}; {problems} {why}",
    )
    bid = str(binary.get("id", ""))
    R.check(
        "the Binary's id (and so the Binary/{id} in DocumentReference.content.attachment.url) is a valid FHIR id "
        "([A-Za-z0-9-.]{1,64})",
        re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", bid) is not None,
        f"id is {len(bid)} characters{', contains ' + repr(sorted(set(re.sub(r'[A-Za-z0-9.-]', '', bid)))) if re.search(r'[^A-Za-z0-9.-]', bid) else ''}: "
        f"{bid[:40]}... — fhir.resources R4B refuses the Binary with it",
    )
    a = http(c, "GET", url, accept="*/*")
    R.check(f"GET {url} without a token -> 401", a.status == 401 and a.reason() == "TOKEN_MISSING", str(a))
    a = http(c, "GET", "Binary/xyz", bearer=bearer)
    R.check("a forged Binary/xyz -> 404 DOCUMENT_NOT_FOUND", a.status == 404 and a.reason() == "DOCUMENT_NOT_FOUND", str(a))
    c.outcomes.append(("forged Binary/xyz", a.body))


def check_partial(c: Ctx):
    hung = c.patient.orgs[1]
    name = next((s.organisation_name for s in c.sources if s.organisation_code == hung), hung)
    admin(c, "PUT", f"/organisations/{hung}/fault", {"fault": "hang"})
    try:
        t0 = time.monotonic()
        a = structured_record(c, c.patient.nhs, token(c), fresh=True, timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        admin(c, "POST", "/reset")
    where = f"$getstructuredrecord with {hung} hung"
    if not R.check(f"{where} -> 200 Bundle (a partial answer is an answer)", a.status == 200 and (a.body or {}).get("resourceType") == "Bundle", str(a), detail=f"{elapsed * 1000:.0f} ms"):
        return
    validate_bundle(where, a.body)
    issues = [
        i
        for r in bundle_resources(a.body)
        if r.get("resourceType") == "OperationOutcome"
        for i in r.get("issue", [])
    ]
    naming = [
        i for i in issues
        if hung in json.dumps(i) or name in json.dumps(i)
    ]
    R.check(
        f"{where}: the Bundle's OperationOutcome has an issue naming {hung}",
        bool(naming) and naming[0].get("severity") in ("warning", "error"),
        f"issues: {json.dumps(issues)[:800]}",
        detail=(naming[0].get("details") or {}).get("text", "") if naming else "",
    )
    answered = {(r.get("meta") or {}).get("source") for r in bundle_resources(a.body) if r.get("resourceType") in CLINICAL}
    want = len(c.patient.orgs) - 1
    R.check(
        f"{where}: the other {want} organisations' data is still there",
        len(answered) >= want,
        f"sources {answered}",
        detail=f"{len(answered)} sources",
    )


def main() -> int:
    c = Ctx()
    c.base = env("EXT_FHIR_BASE")
    c.audience = c.base.rstrip("/")
    c.bin_dir = env("EXT_BIN_DIR")
    c.admin_url = env("EXT_ADMIN_URL").rstrip("/")
    c.key_path = env("EXT_FHIR_TOKEN_KEY")
    config, c.sources = broker_config(env("EXT_BROKER_CONFIG"))
    c.source_urls = source_urls(config)
    c.outcomes = []
    n_patients = int(os.environ.get("EXT_PATIENTS", "500"))
    n_orgs = int(os.environ.get("EXT_ORGS", "8"))

    with open(c.key_path, "rb") as fh:
        key = serialization.load_der_private_key(fh.read(), password=None)
    if not R.check(
        "the key made by `carerecord token new-key` loads as a P-256 PKCS#8 private key in Python",
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1",
        f"got {type(key).__name__}",
    ):
        return R.finish()
    c.key = key

    c.all_patients = region_patients(c.bin_dir, n_patients, n_orgs, limit=n_patients)
    configured = {s.organisation_code for s in c.sources}
    multi = [p for p in c.all_patients if len(p.orgs) >= 3 and not p.conflict and set(p.orgs) <= configured]
    # Skip the first few: check_grpc.py uses them and may have left partial records in the cache.
    multi = multi[6:] if len(multi) > 12 else multi
    if len(multi) < 4:
        R.fail("region has patients known to >= 3 organisations", f"only {len(multi)}")
        return R.finish()
    c.patient, c.more_patients, c.doc_candidates = multi[0], multi[1:4], multi[4:20]
    c.gp = c.patient.orgs[0]
    c.unrelated_org = next(s.organisation_code for s in c.sources if s.organisation_code not in c.patient.orgs)
    c.unknown_nhs = unknown_nhs_number(c)
    print(
        f"  FHIR base {c.base}; patient {c.patient.nhs} ({c.patient.name}) known to {c.patient.orgs}; "
        f"more {[p.nhs for p in c.more_patients]}; unknown {c.unknown_nhs}",
        flush=True,
    )
    if not R.check("the FHIR face answers GET metadata", wait_for_face(c), f"nothing at {c.base}metadata within 20 s"):
        return R.finish()

    R.run("metadata", check_metadata, c)
    R.run("fhirclient metadata", check_fhirclient_metadata, c)
    R.run("structured record", check_structured_record, c)
    if getattr(c, "smart", None) is not None and getattr(c, "bundle", None) is not None:
        R.run("fhirclient bundle", check_fhirclient_bundle, c)
    R.run("errors", check_errors, c)
    R.run("CLI token", check_cli_token, c)
    if getattr(c, "bundle", None) is not None:
        R.run("documents", check_documents, c)
    R.run("error OperationOutcomes", check_outcomes, c)
    # Last: it hangs an organisation (and resets the region afterwards).
    R.run("partial answer", check_partial, c)
    return R.finish()


if __name__ == "__main__":
    sys.exit(main())
