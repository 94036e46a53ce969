"""Mutual TLS from outside: a second broker over the same mock region, with certificates made
here by Python's `cryptography` (a CA, a server certificate, client certificates).

Checks, with grpc.ssl_channel_credentials: a listed calling system (py-ehr.test) gets a record;
a client certificate from the same CA for an unlisted name gets PERMISSION_DENIED; no client
certificate, or one from another CA, cannot connect; a client that does not trust the broker's
CA cannot connect.

Environment (set by run.sh): EXT_BIN_DIR, EXT_BROKER_CONFIG, EXT_TMP, EXT_PIDS_FILE, EXT_ROOT,
EXT_PATIENTS, EXT_ORGS.
"""

from __future__ import annotations

import datetime as dt
import importlib
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Results, broker_config, env, region_patients, toml_table, toml_value  # noqa: E402

R = Results("tls")
SERVICE = "carerecord.v1.CareRecordService"
SERVER_NAME = "broker.test"


def pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca_key, ca_cert, cn: str, dns: list[str], ips: list[str], server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stubs(root: str, out: str):
    from grpc_tools import protoc

    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{root}/proto", f"--python_out={out}", f"--grpc_python_out={out}", "carerecord/v1/carerecord.proto"]
    )
    if rc != 0:
        raise RuntimeError("protoc failed")
    sys.path.insert(0, out)
    return importlib.import_module("carerecord.v1.carerecord_pb2"), importlib.import_module(
        "carerecord.v1.carerecord_pb2_grpc"
    )


def channel(addr: str, root: bytes, key: bytes | None = None, cert: bytes | None = None):
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(addr, creds, options=(("grpc.ssl_target_name_override", SERVER_NAME),))


def main() -> int:
    tmp = os.path.join(env("EXT_TMP"), "tls")
    os.makedirs(tmp, exist_ok=True)
    pb, pb_grpc = stubs(env("EXT_ROOT"), tempfile.mkdtemp(prefix="stubs-", dir=tmp))
    cfg, sources = broker_config(env("EXT_BROKER_CONFIG"))

    # ---- certificates ----
    ca_key, ca = make_ca("carerecord external-check CA")
    other_ca_key, other_ca = make_ca("some other CA")
    srv_key, srv = make_leaf(ca_key, ca, SERVER_NAME, [SERVER_NAME, "localhost"], ["127.0.0.1"], server=True)
    ehr_key, ehr = make_leaf(ca_key, ca, "py-ehr", ["py-ehr.test"], [], server=False)
    rogue_key, rogue = make_leaf(ca_key, ca, "rogue-ehr", ["rogue-ehr.test"], [], server=False)
    alien_key, alien = make_leaf(other_ca_key, other_ca, "py-ehr", ["py-ehr.test"], [], server=False)
    files = {}
    for name, data in {
        "ca.pem": pem_cert(ca),
        "server.pem": pem_cert(srv),
        "server.key": pem_key(srv_key),
    }.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(data)
        files[name] = path
    R.ok("CA, server and client certificates generated with cryptography")

    # ---- the mutual-TLS broker's config: same sources, TLS instead of plaintext ----
    port = free_port()
    addr = f"127.0.0.1:{port}"
    text = toml_table(
        "server",
        {
            "listen": addr,
            "broker_id": "external-tls",
        },
    )
    text += toml_table(
        "server.tls",
        {"cert": files["server.pem"], "key": files["server.key"], "client_ca": files["ca.pem"]},
    )
    text += "\n[[server.tls.systems]]\n" + f"id = {toml_value('py-ehr')}\n" + f"dns_name = {toml_value('py-ehr.test')}\n"
    for s in cfg.get("sources", []):
        text += "\n" + toml_table("[sources]", s)
    conf = os.path.join(tmp, "broker-tls.toml")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(text)

    carerecord = os.path.join(env("EXT_BIN_DIR"), "carerecord")
    p = subprocess.run([carerecord, "check-config", conf], capture_output=True, text=True, timeout=30)
    R.check("carerecord check-config accepts the mutual-TLS config", p.returncode == 0, f"{p.stdout} {p.stderr}")

    log = open(os.path.join(tmp, "broker.log"), "wb")
    proc = subprocess.Popen([carerecord, "serve", "--config", conf], cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    pids = os.environ.get("EXT_PIDS_FILE")
    if pids:
        with open(pids, "a") as fh:
            fh.write(f"{proc.pid}\n")
    try:
        return run_checks(pb, pb_grpc, addr, proc, sources, ca, ehr_key, ehr, rogue_key, rogue, alien_key, alien, other_ca)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_checks(pb, pb_grpc, addr, proc, sources, ca, ehr_key, ehr, rogue_key, rogue, alien_key, alien, other_ca) -> int:
    root = pem_cert(ca)
    good = channel(addr, root, pem_key(ehr_key), pem_cert(ehr))
    deadline = time.monotonic() + 30
    serving = False
    last = ""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = health_pb2_grpc.HealthStub(good).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
            serving = r.status == health_pb2.HealthCheckResponse.SERVING
            if serving:
                break
        except grpc.RpcError as e:
            last = f"{e.code()}: {e.details()}"
        time.sleep(0.1)
    if not R.check("mutual-TLS broker SERVING to a listed client", serving, f"exit={proc.poll()} last error {last}"):
        return R.finish()

    patients = region_patients(
        env("EXT_BIN_DIR"), int(os.environ.get("EXT_PATIENTS", "500")), int(os.environ.get("EXT_ORGS", "8")), limit=50
    )
    patient = next(p for p in patients if len(p.orgs) >= 2 and not p.conflict)
    gp = patient.orgs[0]

    def req():
        return pb.GetCareRecordRequest(
            nhs_number=patient.nhs,
            requester=pb.Requester(user_id="tls-user", role_code="R8000", organisation_code=gp),
        )

    try:
        resp = pb_grpc.CareRecordServiceStub(good).GetCareRecord(req(), timeout=5)
        ok = sorted(s.organisation_code for s in resp.sources if s.outcome == pb.SOURCE_OUTCOME_OK)
        R.check(
            "listed system py-ehr.test gets the record over mutual TLS",
            resp.record.patient.nhs_number == patient.nhs and ok == sorted(patient.orgs) and resp.complete,
            f"patient {resp.record.patient.nhs_number!r} OK {ok} complete={resp.complete}",
        )
    except grpc.RpcError as e:
        R.fail("listed system py-ehr.test gets the record over mutual TLS", f"{e.code()}: {e.details()}")

    rogue_ch = channel(addr, root, pem_key(rogue_key), pem_cert(rogue))
    try:
        pb_grpc.CareRecordServiceStub(rogue_ch).GetCareRecord(req(), timeout=5)
        R.fail("client certificate for an unlisted name (rogue-ehr.test) -> PERMISSION_DENIED", "call succeeded")
    except grpc.RpcError as e:
        R.check(
            "client certificate for an unlisted name (rogue-ehr.test) -> PERMISSION_DENIED",
            e.code() == grpc.StatusCode.PERMISSION_DENIED,
            f"{e.code()}: {e.details()}",
            detail=repr(e.details()),
        )

    def cannot_connect(name: str, ch):
        try:
            pb_grpc.CareRecordServiceStub(ch).GetCareRecord(req(), timeout=3)
            R.fail(name, "call succeeded")
        except grpc.RpcError as e:
            R.check(name, e.code() == grpc.StatusCode.UNAVAILABLE, f"{e.code()}: {e.details()}", detail=e.code().name)

    cannot_connect("no client certificate -> cannot connect (UNAVAILABLE)", channel(addr, root))
    cannot_connect(
        "client certificate from another CA -> cannot connect (UNAVAILABLE)",
        channel(addr, root, pem_key(alien_key), pem_cert(alien)),
    )
    cannot_connect(
        "client that does not trust the broker's CA -> cannot connect (UNAVAILABLE)",
        channel(addr, pem_cert(other_ca), pem_key(ehr_key), pem_cert(ehr)),
    )
    try:
        with grpc.insecure_channel(addr) as plain:
            pb_grpc.CareRecordServiceStub(plain).GetCareRecord(req(), timeout=3)
        R.fail("plaintext client to the TLS broker -> fails", "call succeeded")
    except grpc.RpcError as e:
        R.check("plaintext client to the TLS broker -> fails", e.code() != grpc.StatusCode.OK, f"{e.code()}")

    # The audit trail names the calling system from its certificate.
    audit = os.path.join(os.path.dirname(proc.args[-1]), "carerecord-audit.jsonl")
    events = []
    if os.path.exists(audit):
        import json

        with open(audit, encoding="utf-8") as fh:
            for line in fh:
                try:
                    events.append(json.loads(line).get("event") or {})
                except ValueError:
                    pass
    R.check(
        "audit trail records the calling system py-ehr (from its certificate) for the access",
        any(e.get("system") == "py-ehr" and e.get("kind") == "access" for e in events),
        f"events in {audit}: {[(e.get('kind'), e.get('system')) for e in events]}",
    )
    R.check(
        "audit trail records the unlisted certificate's attempt as denied",
        any(e.get("kind") == "denied" and e.get("system") != "py-ehr" for e in events),
        f"events: {[(e.get('kind'), e.get('system'), e.get('decision')) for e in events]}",
    )
    good.close()
    rogue_ch.close()
    R.check("mutual-TLS broker still running", proc.poll() is None, f"exited {proc.poll()}")
    return R.finish()


if __name__ == "__main__":
    sys.exit(main())
