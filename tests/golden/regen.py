"""Write the golden files: the seed XML examples as inputs, and one expected event per input.

    python -m tests.golden.regen

Run it only when the contract changes, then READ every changed JSON file against CONTRACT §5:
the golden files are the spec the tests hold the code to, not a snapshot of what it does.
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from bridge.carriers import Carriers
from bridge.event import normalize
from bridge.postback import parse

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"
DATA = HERE.parent / "data"
SEEDS = DATA / "seeds"
REFERENCE = DATA / "postbacks"

# Fields the golden files leave out: they change on every run.
VOLATILE = ("id", "received_at")


def seed_examples(text: str) -> list[str]:
    """The XML examples of one seed page: HTML-escaped in <pre> blocks, or ```xml fences."""
    examples = [block.strip() for block in re.findall(r"```xml\n(.*?)```", text, re.DOTALL)]
    for block in re.findall(r"<pre>(.*?)</pre>", text, re.DOTALL):
        markup_gone = re.sub(r"</?(?:p|br)\s*/?>", "", block)
        examples.append(html.unescape(markup_gone).strip())
    return examples


def seed_inputs() -> dict[str, str]:
    """File name -> XML for every seed example, e.g. `seed000_1_sms_mo.xml`."""
    out = {}
    for seed in sorted(SEEDS.glob("*.txt")):
        for n, xml in enumerate(seed_examples(seed.read_text(encoding="utf-8")), start=1):
            origin = re.search(r"<ORIGIN>(\w+)</ORIGIN>", xml)
            kind = origin.group(1).lower() if origin else "unknown"
            out[f"seed{seed.name[:3]}_{n}_{kind}.xml"] = xml + "\n"
    return out


def inputs() -> list[Path]:
    """Every input with a golden file: the reference postbacks and the extracted seed examples."""
    return sorted(REFERENCE.glob("*.xml")) + sorted(INPUTS.glob("*.xml"))


def expected_path(source: Path) -> Path:
    return HERE / f"{source.stem}.json"


def event_of(source: Path) -> dict:
    fields = parse(source.read_bytes())
    event = normalize(fields, event_id="evt_GOLDEN", received_at=datetime.now(UTC), carriers=Carriers())
    return {k: v for k, v in event.items() if k not in VOLATILE}


def main() -> None:
    INPUTS.mkdir(exist_ok=True)
    for name, xml in seed_inputs().items():
        (INPUTS / name).write_text(xml, encoding="utf-8")
    for source in inputs():
        text = json.dumps(event_of(source), indent=2, ensure_ascii=False) + "\n"
        expected_path(source).write_text(text, encoding="utf-8")
        print(f"wrote {expected_path(source).relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
