"""The deployments register on a Prefect server with their schedules and work pool."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
from prefect.client.orchestration import get_client
from deployments.register import register, WORK_POOL
names = register()
with get_client(sync_client=True) as client:
    out = {}
    for name in names:
        d = client.read_deployment_by_name(name)
        out[name] = {"pool": d.work_pool_name, "paused": d.paused, "parameters": d.parameters,
                     "crons": [getattr(s.schedule, "cron", None) for s in d.schedules]}
print(json.dumps(out))
"""


def test_deployments_with_schedules_are_visible_in_the_api(cli_env):
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=cli_env, capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    deployments = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"deployed-pipeline/demo", "deployed-features/demo-nightly", "deployed-precode/demo", "deployed-fit/demo",
            "deployed-tune/demo", "deployed-evaluate/demo-nightly"} <= set(deployments)
    assert deployments["deployed-features/demo-nightly"]["crons"] == ["0 2 * * *"]
    assert deployments["deployed-evaluate/demo-nightly"]["crons"] == ["0 4 * * *"]
    assert all(d["pool"] == "mfiba-local" for d in deployments.values())
    assert deployments["deployed-pipeline/coco-paper"]["paused"] and deployments["deployed-pipeline/demo"]["parameters"] == {"preset": "demo"}
