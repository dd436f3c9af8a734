"""The README's "Across machines" recipe, run on separate hosts.

Hosts are Linux network namespaces on one bridge (see tests/netns.py), each with its own
folder and HOME, knowing only what its environment says:

- P: the database machine, a PostgreSQL server of its own;
- A: the stack host, `mnistops stack up` bound to 0.0.0.0 with `database_url` on P;
- B: a worker host with only the variables of A's `mnistops stack env`;
- C: a workstation with the same variables: publishes data, deploys, trains, promotes,
  and tries every port of A as an attacker would;
- D: a serving host (and, once B's cable is pulled, a second worker).

The tests run in order and share the hosts (one stack start for all of them).
"""

from __future__ import annotations

import json
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from mnistops.flows.deployment import HEARTBEAT_S, UNRESPONSIVE_S
from mnistops.settings import ServeSettings, Settings, load_settings
from mnistops.stack.ports import free_port_config
from tests.netns import Host, Network, Postgres, parse_exports, require_namespaces, start_postgres
from tests.netns import wait_for as wait

HELD_PROXY = Path(__file__).resolve().parent.parent / "held_proxy.py"


def line_of(
    proc: subprocess.Popen[str], timeout_s: float, meanwhile: subprocess.Popen[str] | None = None
) -> str:
    """The next line `proc` prints, waiting at most `timeout_s`, and only while the
    process `meanwhile` (which should make it print) runs."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while not select.select([proc.stdout], [], [], 1)[0]:
        if meanwhile is not None and meanwhile.poll() is not None:
            raise AssertionError(f"it ended first:\n{meanwhile.communicate()[0]}")
        assert time.monotonic() < deadline, f"nothing printed in {timeout_s:.0f} s"
    return proc.stdout.readline().strip()


pytestmark = [pytest.mark.integration, pytest.mark.network]

FAST_TRAINING = {
    "MNISTOPS_HYPERPARAMETER__N_EPOCHS": "1",
    "MNISTOPS_HYPERPARAMETER__BATCH_SIZE": "64",
}


@dataclass
class Machines:
    network: Network
    a: Host
    b: Host
    c: Host
    d: Host
    postgres: Postgres
    settings: Settings
    """host A's settings, as its `stack up` read them"""
    exported: dict[str, str]
    """what A's `mnistops stack env` printed"""
    serve_key: str = ""


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    require_namespaces()
    network = Network(tmp_path_factory.mktemp("network"))
    try:
        p, a, b, c, d = (network.add_host(name) for name in "pabcd")
        postgres = start_postgres(p)
        network.cleanups.append(postgres.stop)
        config = {
            **free_port_config(a.root),
            "home": ".mnistops",
            "data_dir": "data",
            "bind": "0.0.0.0",
            "database_url": postgres.url,
        }
        (a.root / "config").mkdir()
        (a.root / "config" / "stack.yml").write_text(yaml.safe_dump(config))
        network.cleanups.append(lambda: a.mnistops("stack", "down", timeout=120))
        a.ok("stack", "up", timeout=300)
        exported = parse_exports(a.ok("stack", "env"))
        for host in (b, c, d):
            host.env.update(exported)
        c.env.update(FAST_TRAINING)
        settings = load_settings(a.root / "config")
        yield Machines(network, a, b, c, d, postgres, settings, exported)
    finally:
        network.close()


def flow_run_state(host: Host, flow_run_id: str) -> tuple[str, float]:
    """The state of a flow run and when the server set it (Unix time), read by Prefect's
    own client with the exported variables."""
    code = (
        "import sys\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    state = client.read_flow_run(sys.argv[1]).state\n"
        "    print(state.type.value, state.timestamp.timestamp())"
    )
    kind, stamp = host.python(code, flow_run_id).split()
    return kind, float(stamp)


def registered(host: Host) -> dict:
    """The registered versions and the champion, read by MLflow's own client."""
    code = (
        "import json\n"
        "from mlflow import MlflowClient\n"
        "c = MlflowClient()\n"
        "versions = c.search_model_versions(\"name='mnist-classifier'\")\n"
        "model = c.get_registered_model('mnist-classifier')\n"
        "print(json.dumps({'versions': sorted(int(v.version) for v in versions),"
        " 'aliases': model.aliases}))"
    )
    return json.loads(host.python(code))


MLFLOW_RUN_OF = """
import sys
from mlflow import MlflowClient
client = MlflowClient()
experiment = client.get_experiment_by_name("MNIST")
query = f"tags.prefect_flow_run_id = '{sys.argv[1]}'"
found = experiment and client.search_runs([experiment.experiment_id], query)
if found:
    print(found[0].info.status, found[0].data.tags.get("error", ""), sep="\\t")
"""


def mlflow_run_of(host: Host, flow_run_id: str) -> tuple[str, str] | None:
    """(status, error tag) of the MLflow run of a flow run, once it exists."""
    out = host.python(MLFLOW_RUN_OF, flow_run_id)
    if not out:
        return None
    status, _, error = out.partition("\t")
    return status, error


def started_run_id(output: str) -> str:
    """The flow run id from `mnistops run`'s first line ("flow run ID: URL")."""
    return output.split()[2].rstrip(":")


def http(host: Host, method: str, url: str, key: str | None = None, body: bytes = b"") -> tuple:
    """(status, body) of an HTTP request made on `host`."""
    code = (
        "import sys, httpx\n"
        "headers = {'Authorization': f'Bearer {sys.argv[3]}'} if sys.argv[3] else {}\n"
        "r = httpx.request(sys.argv[1], sys.argv[2], headers=headers,"
        " content=bytes.fromhex(sys.argv[4]), timeout=20)\n"
        "print(r.status_code); print(r.text)"
    )
    out = host.python(code, method, url, key or "", body.hex())
    status, _, text = out.partition("\n")
    return int(status), text


GRPC_WITHOUT_CLIENT_CERTIFICATE = """
import socket, ssl, sys
from mnistops.stack.store_security import HTTP2_PREFACE, grpc_open_without_tls
host, port = sys.argv[1], int(sys.argv[2])
assert not grpc_open_without_tls(host, port), "plain gRPC answered"
tls = ssl.create_default_context()
tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
tls.set_alpn_protocols(["h2"])
try:
    with socket.create_connection((host, port), 3) as raw, tls.wrap_socket(raw) as conn:
        conn.sendall(HTTP2_PREFACE)
        answer = conn.recv(9)
        print("answered" if len(answer) == 9 and answer[3] == 4 else "refused")
except OSError:
    print("refused")
"""
"""a gRPC client with TLS but no certificate of the stack's CA: the handshake fails"""


def test_the_stack_host_lets_in_only_what_has_credentials(machines: Machines) -> None:
    a, c, s = machines.a, machines.c, machines.settings
    exported = machines.exported
    # Bound to 0.0.0.0, it advertises the address other hosts reach it at.
    assert exported["MNISTOPS_S3__ENDPOINT_URL"] == f"http://{a.address}:{s.s3.port}"
    assert exported["MLFLOW_TRACKING_URI"] == f"http://{a.address}:{s.mlflow.port}"
    assert exported["PREFECT_API_URL"] == f"http://{a.address}:{s.prefect.port}/api"

    client_ports = {s.s3.port, s.mlflow.port, s.prefect.port}
    # SeaweedFS binds the S3 gateway's gRPC port with its API (no flag parts them); it
    # speaks only mutual TLS with the stack's own certificates.
    s3_grpc = s.s3.port + s.s3.grpc_offset
    listening = a.listening()
    beyond = {port for address, port in listening if address not in ("127.0.0.1", "::1")}
    assert beyond == client_ports | {s3_grpc}, listening
    # An attacker on C tries every port A listens on, loopback-only ones included.
    reachable = {port for _, port in listening if c.connects(a.address, port)}
    assert reachable == client_ports | {s3_grpc}
    assert c.python(GRPC_WITHOUT_CLIENT_CERTIFICATE, a.address, str(s3_grpc)) == "refused"

    anonymous = (
        "import sys, boto3\n"
        "from botocore import UNSIGNED\n"
        "from botocore.config import Config\n"
        "from botocore.exceptions import ClientError\n"
        "s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',"
        " config=Config(signature_version=UNSIGNED, retries={'max_attempts': 1}))\n"
        "try:\n"
        "    s3.list_objects_v2(Bucket='dvc'); print('listed')\n"
        "except ClientError as exc:\n"
        "    print(exc.response['Error']['Code'])"
    )
    assert c.python(anonymous, exported["AWS_ENDPOINT_URL"]) == "AccessDenied"
    mlflow = exported["MLFLOW_TRACKING_URI"]
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http(c, "GET", search)[0] == 401
    assert http(c, "GET", f"{exported['PREFECT_API_URL']}/admin/version")[0] == 401
    # MLflow answers to the advertised name; another Host header is refused.
    assert http(c, "GET", f"{mlflow}/health")[0] == 200

    # Who can reach what is read from the running services, whatever the shell says.
    claims = {"MNISTOPS_MLFLOW__AUTH": "false", "MNISTOPS_PREFECT__AUTH": "false"}
    status = a.ok("stack", "status", env=claims)
    text = " ".join(status.split())
    assert "any host (S3 keys)" in text and text.count("any host (login)") == 2, text

    # A name of A that it does not advertise: MLflow refuses it, and the message says so.
    machines.network.name_hosts(c, {"stack-alias": a.address})
    alias = f"http://stack-alias:{s.mlflow.port}"
    renamed = {"MNISTOPS_MLFLOW__TRACKING_URI": alias, "MLFLOW_TRACKING_URI": alias}
    refused = c.mnistops("models", env=renamed)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused the host name" in " ".join(refused.stderr.split()), refused.stderr
    logins_off = {"MNISTOPS_MLFLOW__AUTH": "false", "MNISTOPS_PREFECT__AUTH": "false"}
    warned = a.mnistops("stack", "up", env=logins_off)
    warnings = " ".join(warned.stderr.split())
    for service in ("MLflow", "Prefect"):
        assert f"warning: {service} on 0.0.0.0" in warnings, warnings
    assert "has no login" in warnings and "any host that can reach this machine" in warnings


@pytest.mark.slow("another host's worker trains a version, then a new version's event trains again")
def test_a_worker_host_pulls_and_runs_the_retraining(machines: Machines) -> None:
    b, c = machines.b, machines.c
    c.ok("data", "ingest", "--fast", timeout=300)
    c.ok("data", "version", "v1.0", "-m", "first images", timeout=300)
    c.ok("deploy", timeout=300)
    b.ok("worker", "--detach", timeout=120)

    b.ok("data", "pull", "v1.0", "--to", "v1", timeout=300)
    digits = sorted(p.name for p in (b.root / "v1" / "train").iterdir())
    assert digits == [str(n) for n in range(10)]

    done = c.ok("run", "--wait", timeout=600)
    assert "Completed" in done, done
    found = registered(c)
    assert found["versions"] == [1] and found["aliases"] == {"champion": "1"}, found


PLAIN_MLFLOW_DOWNLOAD = """
import sys, mlflow
champion = "models:/mnist-classifier@champion"
print(mlflow.artifacts.download_artifacts(champion, dst_path=sys.argv[1]))
"""


@pytest.mark.slow("two models are trained and promoted while another host serves them")
def test_a_serving_host_follows_the_champion(machines: Machines) -> None:
    c, d = machines.c, machines.d
    serve_url = f"http://{d.address}:{ServeSettings().port}"  # D: the default port
    d.env.update({"MNISTOPS_BIND": d.address, "MNISTOPS_SERVE__URL": serve_url})
    refused = d.mnistops("serve", "--detach")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "without an API key" in " ".join(refused.stderr.split())

    key = machines.serve_key = secrets.token_urlsafe(24)
    d.env["MNISTOPS_SERVE__API_KEY"] = key
    served = d.ok("serve", "--detach", timeout=180)
    assert "ready, v1" in served, served + d.log_tails()
    model = json.loads(http(c, "GET", f"{serve_url}/model", key)[1])
    assert model["version"] == "1", model
    digit = next((c.root / "data" / "MNIST" / "test" / "7").iterdir()).read_bytes()
    assert http(c, "POST", f"{serve_url}/predict", None, digit)[0] == 401
    status, answer = http(c, "POST", f"{serve_url}/predict", key, digit)
    assert status == 200 and json.loads(answer)["model_version"] == "1"

    # A plain MLflow client downloads the champion too: the server's presigned links
    # name the advertised S3 endpoint, which other hosts reach.
    fetched = c.python(PLAIN_MLFLOW_DOWNLOAD, str(c.root / "champion"))
    assert (Path(fetched) / "MLmodel").is_file(), fetched

    # New data from C: the trigger starts a retraining on B's worker.
    c.ok("data", "add", str(c.root / "data" / "MNIST" / "train_v2"), timeout=300)
    c.ok("data", "version", "v2.0", "-m", "new images", timeout=300)
    # B's worker is the only one yet: it ran the retraining.
    wait(lambda: 2 in registered(c)["versions"], 420, "the triggered retraining's model")


@pytest.mark.slow(
    "a run is CRASHED only after 30 s of heartbeat and 75 s of silence; two hosts train"
)
def test_a_cut_cable_crashes_the_run_and_another_host_runs_the_next(
    machines: Machines,
) -> None:
    """B's cable is pulled mid-training. While the server waits for B's heartbeats, C
    trains and promotes a model, and D serves it; then the run is CRASHED, its slot is
    freed, D's worker runs the next one, and that run ends the orphan MLflow run."""
    b, c, d = machines.b, machines.c, machines.d
    started = c.ok("run", "--epochs", "400", timeout=120)
    doomed = started_run_id(started)
    wait(lambda: mlflow_run_of(c, doomed), 300, "the training to start on B")
    b.cut()
    cut_at = time.time()  # the namespaces share this machine's clock with the server
    d.ok("worker", "--detach", timeout=120)
    follower = c.popen("run", "--wait")

    c.ok("train", "--data-version", "v2.0", timeout=600)
    newest = max(registered(c)["versions"])
    c.ok("models", "promote", str(newest), "-m", "network test", timeout=120)
    serve_url, key = f"http://{d.address}:{ServeSettings().port}", machines.serve_key

    def serving_newest() -> bool:
        found = json.loads(http(c, "GET", f"{serve_url}/model", key)[1])
        return found["version"] == str(newest)

    wait(serving_newest, 60, f"D to serve v{newest}")

    final, crashed_at = wait(
        lambda: (state := flow_run_state(c, doomed))[0] not in ("RUNNING", "PENDING") and state,
        150,
        "the cut-off run to end",
        every=5,
    )
    assert final == "CRASHED", final
    # Judged on the server's own record of when it crashed the run, not on this poll:
    # heartbeat + silence = 105 s, then the server's trigger loop; the rest is room for
    # a loaded machine.
    took = crashed_at - cut_at
    assert took <= 135, (
        f"CRASHED {took:.0f} s after the cut (heartbeat {HEARTBEAT_S} s,"
        f" silence {UNRESPONSIVE_S} s)"
    )
    output, _ = follower.communicate(timeout=600)
    assert follower.returncode == 0 and "Completed" in output, output
    status, error = mlflow_run_of(c, doomed)
    assert status == "KILLED" and "CRASHED" in error.upper(), (status, error)


@pytest.mark.slow("the stack host's services are stopped and started again mid-pull")
def test_a_pull_while_the_stack_host_restarts_leaves_nothing_half_written(
    machines: Machines,
) -> None:
    """B, back with a new disk, pulls v2.0 through a proxy of its own that holds its
    first request for an object; while B waits on it, A's services go down: the pull
    fails, saying nothing was written. With A back up, the same pull completes."""
    a, b = machines.a, machines.b
    b.kill_everything()  # B's cut-off processes: the machine is rebooted
    b.reconnect()
    new_disk = {"MNISTOPS_HOME": str(b.root / "new-disk")}  # no cached objects
    store = urlsplit(machines.exported["MNISTOPS_S3__ENDPOINT_URL"])
    proxy = subprocess.Popen(
        b.argv(
            sys.executable,
            str(HELD_PROXY),
            str(store.hostname),
            str(store.port),
            "GET",
            "/files/md5/",
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = line_of(proxy, timeout_s=60)
        through = {"MNISTOPS_S3__ENDPOINT_URL": url, "AWS_ENDPOINT_URL": url}
        pull = b.popen("data", "pull", "v2.0", "--to", "v2", env={**new_disk, **through})
        assert line_of(proxy, timeout_s=300, meanwhile=pull) == "held", "no object asked for"
        a.ok("stack", "down", timeout=120)
        output, _ = pull.communicate(timeout=300)
    finally:
        proxy.kill()
    assert pull.returncode == 1, output
    assert "downloading" in output, output
    assert "Traceback" not in output and "Nothing was written" in output, output
    assert not (b.root / "v2").exists()
    assert [p.name for p in b.root.iterdir() if ".partial" in p.name] == []

    a.ok("stack", "up", timeout=300)
    again = b.ok("data", "pull", "v2.0", "--to", "v2", env=new_disk, timeout=300)
    assert "v2.0" in again
    b.ok("data", "pull", "v2.0", "--to", "v2", "--verify", env=new_disk, timeout=300)
