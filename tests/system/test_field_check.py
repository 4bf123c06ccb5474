"""The merge-field mapping is checked against the audience's own fields: at sync start-up and on demand."""

import asyncio
import json
import subprocess
import sys

from tests.conftest import ROOT, esp_targets


def toml(targets: dict) -> str:
    """The ESP file as an operator writes it: one table per target, its field mapping as a sub-table."""
    lines = []
    for name, target in targets.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in target.items() if key != "fields"]
        lines.append(f"[{name}.fields]")
        for trait, entry in target["fields"].items():
            value = json.dumps(entry) if isinstance(entry, str) else "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in entry.items()) + " }"
            lines.append(f"{trait} = {value}")
    return "\n".join(lines) + "\n"


async def test_mapping_problems_are_reported_clearly(system, sandbox, klaviyo_sandbox, sendgrid_sandbox, tmp_path):
    esp_file = tmp_path / "esps.toml"
    targets = esp_targets(sandbox, klaviyo_sandbox, sendgrid_sandbox,
                          mailchimp={"fields": {"first_name": "FNAME", "shoe_size": {"tag": "SHOES", "type": "number"},
                                                "lifetime_value": {"tag": "LTV", "type": "text"}}},
                          klaviyo={"fields": {"city": "location.town"}},
                          sendgrid={"fields": {"first_name": "first_name", "shoe_size": "shoes"}})
    esp_file.write_text(toml(targets))
    env = {**system.env, "MERGETAG_ESP_FILE": str(esp_file)}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "esp", "check"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert json.loads(out.stdout) == {
        "mailchimp": {"problems": ["lifetime_value: LTV is a number field, the mapping converts to text",
                                   "shoe_size: merge field SHOES is not defined on the audience"]},
        "klaviyo": {"problems": ["city: location.town is not a Klaviyo location attribute"]},
        "sendgrid": {"problems": ["shoe_size: custom field shoes is not defined"]},
    }
    esp_file.write_text(toml(esp_targets(sandbox, klaviyo_sandbox, sendgrid_sandbox, mailchimp={"fields": {"first_name": "FNAME"}})))
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "esp", "check"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(not v["problems"] for v in json.loads(out.stdout).values())
    # The running sync said so when it started: its mapping names CITY, which the audience lacked then.
    assert "field mapping does not fit ESP target mailchimp: city: merge field CITY" in (system.logs / "sync.log").read_text()
