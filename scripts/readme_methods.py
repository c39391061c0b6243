"""The README's methods table, made from the method registry (each method's declared facts) and the
model catalogue (which weights ship), so that the README cannot fall behind the code.

    .venv/bin/python scripts/readme_methods.py           # print the table
    .venv/bin/python scripts/readme_methods.py --write   # replace it in README.md

``Testing/test_readme.py`` checks that README.md holds exactly this table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from BrainLesionSAMLib import catalogue  # noqa: E402
from BrainLesionSAMLib.conventions import MODALITY_DISPLAY_NAMES  # noqa: E402
from BrainLesionSAMLib.methods import get_method_class, method_names  # noqa: E402
from Training.config import available_configs  # noqa: E402

README = REPOSITORY / "README.md"
TABLE_START = "<!-- methods table: written by scripts/readme_methods.py from the registry and the catalogue -->"
TABLE_END = "<!-- end of the methods table -->"
OUTPUTS = {"brats": "BraTS sub-regions (NCR, ED, ET)", "lesion": "one lesion class"}


def _inputs(facts) -> str:
    """'2D; FLAIR needed' or '2D; any of T1, T1CE, T2, FLAIR' (a method tolerating missing ones)."""
    if facts.required_modalities:
        text = ", ".join(MODALITY_DISPLAY_NAMES[m] for m in facts.required_modalities) + " needed"
    else:
        text = "any of " + ", ".join(MODALITY_DISPLAY_NAMES[m] for m in facts.modalities)
    return f"{facts.spatial_dims}D; {text}"


def _box(facts) -> str:
    if facts.requires_box:
        return "needed"
    return "optional prompt" if facts.promptable else "restricts the output"


def _weights(name: str, entries, configs: set[str]) -> str:
    shipped = []
    for entry in entries:
        if entry.kind == "download":
            where = "downloaded on first use, sha256-verified"
        elif entry.kind == "package":
            where = ("inside the library" if entry.package.package == "BrainLesionSAMLib"
                     else f"shipped by `{entry.package.package.replace('_', '-')}`")
        else:
            where = "bring the file (`catalogue.import_weights`)"
        default = " (default)" if entry is entries[0] and len(entries) > 1 else ""
        experimental = " **experimental**" if entry.experimental else ""
        shipped.append(f"`{entry.id}`{default}{experimental}: {entry.title}, {where}")
    if shipped:
        return "; ".join(shipped)
    if name in configs:
        return f"none ship: train with `brainlesionsam-train --config {name}`, then `--weights FILE`"
    return "none ship: give a third-party checkpoint with `--weights FILE`"


def methods_table() -> str:
    entries = catalogue.load_catalogue()
    configs = set(available_configs())
    rows = ["| method | what | input | output | box | weights |", "| --- | --- | --- | --- | --- | --- |"]
    for name in method_names():
        facts = get_method_class(name).facts
        rows.append(f"| `{name}` | {facts.title} | {_inputs(facts)} | {OUTPUTS[facts.label_set]} | {_box(facts)} | "
                    f"{_weights(name, entries.for_method(name), configs)} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    return text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)].strip("\n")


def write_readme() -> None:
    text = README.read_text(encoding="utf-8")
    old = readme_table(text)
    README.write_text(text.replace(old, methods_table(), 1) if old else
                      text.replace(TABLE_START, TABLE_START + "\n" + methods_table(), 1), encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    if parser.parse_args().write:
        write_readme()
        print(f"wrote the methods table into {README}")
    else:
        print(methods_table())
