"""Deterministic, realistic backup zips, shaped like the ones Zoho CRM produces.

``Data_NNN.zip`` holds ``Data/<Module>_001.csv`` per module (UTF-8 with a BOM, field labels
as headers) and ``Metadata/*.csv``; ``Attachments_NNN.zip`` holds the files under
``Attachments/``, named by attachment record id and the file's own name (non-ASCII names
included). Each part is a complete zip on its own; ``many=`` adds a part of that many small
members (from 65 536 on, a Zip64 archive), :func:`corrupt_member` damages one member.
"""

from __future__ import annotations

import csv
import io
import random
import struct
import zipfile
from dataclasses import dataclass

ZIP_TIME = (2026, 11, 21, 3, 15, 0)

MODULES: dict[str, list[str]] = {
    "Leads": ["Record Id", "Lead Owner", "Company", "First Name", "Last Name", "Email",
              "Phone", "Lead Source", "Lead Status", "Created Time", "Modified Time"],
    "Contacts": ["Record Id", "Contact Owner", "First Name", "Last Name", "Account Name.id",
                 "Email", "Phone", "Mailing City", "Created Time", "Modified Time"],
    "Accounts": ["Record Id", "Account Owner", "Account Name", "Website", "Industry",
                 "Annual Revenue", "Billing City", "Created Time", "Modified Time"],
    "Deals": ["Record Id", "Deal Owner", "Deal Name", "Amount", "Stage", "Closing Date",
              "Account Name.id", "Created Time", "Modified Time"],
    "Notes": ["Record Id", "Note Title", "Note Content", "Parent Id.id", "Created Time"],
    "Tasks": ["Record Id", "Subject", "Due Date", "Status", "Priority", "Created Time"],
    "Users": ["Record Id", "Full Name", "Email", "Role.id", "Profile.id", "Status"],
    "Project_Sites_C": ["Record Id", "Name", "Site Address", "Contact.id", "Created Time"],
}
ATTACHMENT_COLUMNS = ["Record Id", "File Name", "Size", "Parent.id", "Record Status",
                      "Documents", "Created Time", "Modified Time", "Old Attachment Id",
                      "Field.id", "Link URL"]
_FIRST = ["Ana", "Björn", "Chen", "Dara", "Émile", "Farah", "Giulia", "Hiro", "Ivan", "Jyoti"]
_LAST = ["Ahmed", "Berg", "Costa", "Dubois", "Egede", "Fujita", "García", "Horvat", "Ito"]
_WORDS = ["renewal", "quote", "follow-up", "demo", "contract", "invoice", "onsite", "pilot"]
_PEOPLE = ["Bj\u00f6rn", "\u00c9mile", "Garc\u00eda", "\u0141ukasz", "\u5c71\u7530"]
_EXTENSIONS = [".pdf", ".png", ".docx", ".xlsx", ".jpg", ".txt"]


@dataclass(frozen=True)
class Backup:
    zgid: str
    job_id: str
    files: dict[str, bytes]  # file name -> zip bytes


def _record_id(rng: random.Random) -> str:
    return f"4876876{rng.randrange(10**12):012d}"


def _value(rng: random.Random, column: str, row: int) -> str:
    if column == "Record Id" or column.endswith(".id"):
        return _record_id(rng)
    if "Time" in column or "Date" in column:
        return f"2026-{rng.randint(1, 11):02d}-{rng.randint(1, 28):02d}T10:{row % 60:02d}:00+05:30"
    if column == "Email":
        return f"{rng.choice(_FIRST).lower()}.{row}@example.com"
    if column in ("Amount", "Annual Revenue"):
        return f"{rng.randint(1000, 900000)}.00"
    if "Name" in column or "Owner" in column:
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


def _csv(columns: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return b"\xef\xbb\xbf" + out.getvalue().encode("utf-8")


def _add(zf: zipfile.ZipFile, name: str, data: bytes, compress: bool) -> None:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def generate(seed: int = 1, size: int = 24 << 20, part_size: int = 1 << 30,
             zgid: str = "757345985", job_id: str = "4876876000001594004",
             rows: int = 200, many: int = 0) -> Backup:
    """A backup of about ``size`` bytes, attachments split into parts of ``part_size``,
    plus, with ``many``, a last part of that many small attachments."""
    rng = random.Random(seed)
    data = io.BytesIO()
    attachments: list[tuple[str, str, int]] = []  # (record id, file name, size)
    budget = max(0, size - 64 * 1024 * len(MODULES))
    largest = max(16 * 1024, min(2 << 20, part_size // 2))
    while budget > 0:
        n = min(budget, rng.randint(16 * 1024, largest))
        # Every other file is named after a person: names that need UTF-8 in the zip.
        word = rng.choice(_PEOPLE if len(attachments) % 2 else _WORDS)
        name = f"{word}-{len(attachments) + 1}{rng.choice(_EXTENSIONS)}"
        attachments.append((_record_id(rng), name, n))
        budget -= n
    with zipfile.ZipFile(data, "w") as zf:
        for module, columns in MODULES.items():
            table = [[_value(rng, c, r) for c in columns] for r in range(rows)]
            _add(zf, f"Data/{module}_001.csv", _csv(columns, table), compress=True)
        att_rows = [[rid, name, str(n), _record_id(rng), "Available", "",
                     "2026-11-01T09:00:00+05:30", "2026-11-02T09:00:00+05:30", "", "", ""]
                    for rid, name, n in attachments]
        _add(zf, "Data/Attachments_001.csv", _csv(ATTACHMENT_COLUMNS, att_rows), compress=True)
        modules = [[_record_id(rng), m, m.replace("_C", "").replace("_", " ")] for m in MODULES]
        _add(zf, "Metadata/Modules_001.csv",
             _csv(["Record Id", "API Name", "Module Name"], modules), compress=True)
        fields = [[_record_id(rng), m, c] for m, cols in MODULES.items() for c in cols]
        _add(zf, "Metadata/Fields_001.csv",
             _csv(["Record Id", "Module", "Field Label"], fields), compress=True)
    files = {"Data_001.zip": data.getvalue()}

    part = 0
    current: io.BytesIO | None = None
    zf_part: zipfile.ZipFile | None = None
    for rid, name, n in attachments:
        # 1 KiB covers the entry's headers and the central directory's share.
        if zf_part is None or (current is not None and current.tell() + n + 1024 > part_size
                               and current.tell() > 0):
            if zf_part is not None and current is not None:
                zf_part.close()
                files[f"Attachments_{part:03d}.zip"] = current.getvalue()
            part += 1
            current = io.BytesIO()
            zf_part = zipfile.ZipFile(current, "w", allowZip64=True)
        # Attachment bodies are already compressed formats in real backups: random bytes
        # stored as-is are the honest stand-in (and keep part sizes predictable).
        _add(zf_part, f"Attachments/{rid}_{name}", rng.randbytes(n), compress=False)
    if zf_part is not None and current is not None:
        zf_part.close()
        files[f"Attachments_{part:03d}.zip"] = current.getvalue()
    if many:
        small = io.BytesIO()
        with zipfile.ZipFile(small, "w", allowZip64=True) as zf:
            for i in range(many):
                _add(zf, f"Attachments/{_record_id(rng)}_note-{i}.txt",
                     f"attachment {i}\n".encode(), compress=i % 2 == 0)
        files[f"Attachments_{part + 1:03d}.zip"] = small.getvalue()
    return Backup(zgid, job_id, files)


def corrupt_member(archive: bytes, name: str) -> bytes:
    """``archive`` with one byte in the middle of member ``name``'s data flipped: its
    headers and CRC-32 say what it held before."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = zf.getinfo(name)
    # The local header's name and extra lengths (at 26 and 28) say where the data starts.
    name_len, extra_len = struct.unpack_from("<HH", archive, info.header_offset + 26)
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    damaged = bytearray(archive)
    damaged[at] ^= 0x01
    return bytes(damaged)
