"""Shared helpers for the external (integrator's-eye) checks: result tally, the region's
patients, the broker config the mock region wrote, and NHS number arithmetic.

Nothing here imports the project: everything is learned the way an integrator would, from the
binaries' output, the written config and the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path


class Results:
    """Counts checks. Each check prints one `PASS`/`FAIL` line; the totals go to the file named
    by $EXT_RESULTS (one `passed failed` line per script) so run.sh can print the closing line."""

    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        print(f"PASS [{self.suite}] {name}" + (f" — {detail}" if detail else ""), flush=True)

    def fail(self, name: str, why: str) -> None:
        self.failed += 1
        self.failures.append(f"{name}: {why}")
        print(f"FAIL [{self.suite}] {name}: {why}", flush=True)

    def check(self, name: str, condition: bool, why: str = "", detail: str = "") -> bool:
        if condition:
            self.ok(name, detail)
        else:
            self.fail(name, why or "condition false")
        return condition

    def run(self, name: str, fn, *args, **kwargs):
        """Runs one check function; an exception fails that check only."""
        try:
            return fn(*args, **kwargs)
        except AssertionError as e:
            self.fail(name, str(e) or "assertion failed")
        except Exception as e:  # noqa: BLE001 — any crash is a failed check, with its cause
            tb = traceback.format_exc(limit=3)
            self.fail(name, f"{type(e).__name__}: {e}\n{tb}")
        return None

    def finish(self) -> int:
        print(f"[{self.suite}] {self.passed} passed, {self.failed} failed", flush=True)
        if self.failures:
            print(f"[{self.suite}] failures:", flush=True)
            for f in self.failures:
                print(f"  - {f}", flush=True)
        out = os.environ.get("EXT_RESULTS")
        if out:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(f"{self.passed} {self.failed}\n")
        return 1 if self.failed else 0


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"environment variable {name} is required (run via tests/external/run.sh)")
    return value


# ---- NHS numbers --------------------------------------------------------------------------


def nhs_check_digit(first9: str) -> int | None:
    """Modulus 11 check digit for nine digits; None when the number cannot be valid."""
    total = sum(int(d) * (10 - i) for i, d in enumerate(first9))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def nhs_valid(number: str) -> bool:
    if not re.fullmatch(r"\d{10}", number or ""):
        return False
    return nhs_check_digit(number[:9]) == int(number[9])


def nhs_invalid_variant(number: str) -> str:
    """The same number with a wrong check digit."""
    good = int(number[9])
    return number[:9] + str((good + 1) % 10)


def grouped(number: str) -> str:
    return f"{number[:3]} {number[3:6]} {number[6:]}"


# ---- the region ---------------------------------------------------------------------------


@dataclass
class RegionPatient:
    nhs: str
    name: str
    birth_date: str
    orgs: list[str]
    conflict: bool = False


PATIENT_LINE = re.compile(r"^(\d{10})\s+(.*?)\s+(\d{4}-\d{2}-\d{2})\s+(\S+)(.*)$")


def region_patients(bin_dir: str, patients: int, organisations: int, limit: int = 50) -> list[RegionPatient]:
    """`mock-sources patients` parsed: NHS number first, organisation codes after the birth date."""
    out = subprocess.run(
        [
            os.path.join(bin_dir, "mock-sources"),
            "patients",
            "--patients",
            str(patients),
            "--organisations",
            str(organisations),
            "--limit",
            str(limit),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result = []
    for line in out.splitlines():
        m = PATIENT_LINE.match(line)
        if not m:
            continue
        result.append(
            RegionPatient(
                nhs=m.group(1),
                name=m.group(2).strip(),
                birth_date=m.group(3),
                orgs=m.group(4).split(","),
                conflict="conflicting" in m.group(5),
            )
        )
    if not result:
        raise RuntimeError(f"no patients parsed from mock-sources output:\n{out[:2000]}")
    return result


@dataclass
class ConfiguredSource:
    id: str
    organisation_code: str
    organisation_name: str
    base_url: str
    raw: dict = field(default_factory=dict)


def broker_config(path: str) -> tuple[dict, list[ConfiguredSource]]:
    with open(path, "rb") as fh:
        cfg = tomllib.load(fh)
    sources = [
        ConfiguredSource(
            id=s["id"],
            organisation_code=s["organisation_code"],
            organisation_name=s["organisation_name"],
            base_url=s.get("fhir", {}).get("base_url", ""),
            raw=s,
        )
        for s in cfg.get("sources", [])
    ]
    return cfg, sources


# ---- minimal TOML writer (for the TLS broker's config) ------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def toml_table(header: str, table: dict) -> str:
    """`[header]` (or `[[header]]` when header starts with `[`) with scalars, then subtables."""
    lines = [f"[{header}]"]
    subs = []
    for k, v in table.items():
        if isinstance(v, dict):
            subs.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    text = "\n".join(lines) + "\n"
    base = header.strip("[]")
    for k, v in subs:
        text += toml_table(f"{base}.{k}", v)
    return text


def path_str(p: Path | str) -> str:
    return str(Path(p).resolve())
