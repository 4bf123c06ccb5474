"""The merge-field mapping is checked against the audience's own fields: at sync start-up and on demand."""

import asyncio
import json
import subprocess
import sys

from tests.conftest import ROOT


async def test_mapping_problems_are_reported_clearly(system):
    env = {**system.env, "MERGETAG_MERGE_FIELDS": json.dumps({"first_name": "FNAME", "shoe_size": {"tag": "SHOES", "type": "number"},
                                                              "lifetime_value": {"tag": "LTV", "type": "text"}})}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "esp", "check"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert json.loads(out.stdout)["mailchimp"]["problems"] == [
        "lifetime_value: LTV is a number field, the mapping converts to text",
        "shoe_size: merge field SHOES is not defined on the audience",
    ]
    # The running sync said so when it started: its mapping names CITY, which the audience lacked then.
    assert "field mapping does not fit ESP target mailchimp: city: merge field CITY" in (system.logs / "sync.log").read_text()
