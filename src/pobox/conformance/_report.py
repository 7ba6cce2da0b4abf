"""Results of a conformance run, grouped by RFC, as text or JSON.

May import: the standard library only.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Final

__all__ = ["SECTIONS", "Check", "Report", "Status"]

#: The RFCs the suite covers, in report order.
SECTIONS: Final = {
    "RFC 1939": "POP3",
    "RFC 2449": "POP3 extension mechanism (CAPA, response codes)",
    "RFC 3206": "SYS and AUTH response codes",
    "RFC 2595": "STLS",
    "RFC 5034": "SASL AUTH",
    "RFC 6856": "UTF8 and LANG",
}


class Status(enum.Enum):
    """The outcome of one check."""

    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome; ``detail`` says why it failed or was skipped."""

    rfc: str
    id: str
    title: str
    status: Status
    detail: str = ""


@dataclass
class Report:
    """Every check of a run, in the order they ran."""

    target: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any check failed (the exit status is 1 then)."""
        return any(check.status is Status.FAIL for check in self.checks)

    def status(self, check_id: str) -> Status:
        """Return the status of the check ``check_id``.

        Raises:
            KeyError: no such check ran.
        """
        for check in self.checks:
            if check.id == check_id:
                return check.status
        raise KeyError(check_id)

    def ids(self, status: Status) -> list[str]:
        """Return the ids of the checks with ``status``, in order."""
        return [check.id for check in self.checks if check.status is status]

    def counts(self) -> dict[str, int]:
        """Return how many checks passed, failed and were skipped."""
        return {s.value: sum(1 for c in self.checks if c.status is s) for s in Status}

    def text(self) -> str:
        """Return the report for a terminal: one block per RFC, then the totals."""
        lines = [f"POP3 conformance of {self.target}"]
        for rfc, name in SECTIONS.items():
            checks = [check for check in self.checks if check.rfc == rfc]
            if not checks:
                continue
            lines.append("")
            lines.append(f"{rfc}: {name}")
            for check in checks:
                line = f"  {check.status.value}  {check.id:<28} {check.title}"
                if check.detail:
                    line += f" -- {check.detail}"
                lines.append(line)
        counts = self.counts()
        lines.append("")
        lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
        return "\n".join(lines) + "\n"

    def json(self) -> str:
        """Return the report as JSON: the target, the sections with their checks, the totals."""
        sections = [
            {
                "rfc": rfc,
                "name": name,
                "checks": [
                    {
                        "id": check.id,
                        "title": check.title,
                        "status": check.status.value,
                        "detail": check.detail,
                    }
                    for check in self.checks
                    if check.rfc == rfc
                ],
            }
            for rfc, name in SECTIONS.items()
        ]
        return json.dumps(
            {"target": self.target, "sections": sections, "totals": self.counts()}, indent=2
        )
