"""End to end on two Ray nodes: verl's trainer (``examples/run_tiny_cpu.sh``) with ``trainer.nnodes=2``.

The test starts its own cluster on 127.0.0.1, as ``docs/multinode.md`` tells a user to: a head and a second
node, each a ``ray start --block`` in its own process group, with its own ports (free ones, found by binding),
its own temp dir, and token authentication on (``RAY_AUTH_MODE=token`` and a fresh token in a 0600 file named
by ``RAY_AUTH_TOKEN_PATH``, for both nodes and the driver). Every node gets CPU mode's environment before
``ray start`` (Ray workers inherit their node's environment, not the driver's) and logical GPUs: 1 on the
head, 2 on the second node, for 2 trainer ranks and 1 teacher replica.

The run joins the cluster (``ray_kwargs.ray_init.address``, with ``num_cpus`` / ``num_gpus`` null as Ray
requires when joining) and passes ``VERL_FILE_LOGGER_PATH`` to its workers through the job's runtime_env
(``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH``): the nodes do not have it. The test
then reads Ray's actor table: rank 0 and rank 1 of the trainer ran on different nodes, the ones it started.

Teardown stops the two ``ray start`` process groups and any process they spawned, by id, and checks that none
is left. Never ``ray stop``: it ends every Ray on the machine.

About 3-5 minutes on 2 shared cores (marker ``e2e``).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from tiny_runs import REPO_ROOT, SYNCED_MAX_DIFF, run_script

RAY = Path(sys.executable).parent / "ray"
HOST = "127.0.0.1"
NODE_START_TIMEOUT_S = 180
STEPS = 2
HEAD_GPUS, SECOND_NODE_GPUS = 1, 2  # logical: 2 trainer ranks (one per node) + 1 teacher replica
TRAINER_WORKERS = "WorkerDict_"  # verl's colocated worker class (create_colocated_worker_cls)
NODE_CPUS = 16  # logical: verl's placement bundles ask for 3 CPUs each

# What examples/run_tiny_cpu.sh exports for its own workers; on a cluster it started elsewhere, each node's
# `ray start` must have it (docs/multinode.md, "Every node").
CPU_MODE_ENV = {
    "TIP_VERL_CPU": "1",
    "VERL_USE_EXTERNAL_MODULES": "tip_verl.cpu.plugin,tip_verl.verl_ext.plugin",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
NODE_PORTS = (  # `ray start` options that take a port; each node gets its own free one
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)

# Run in a fresh interpreter with the cluster's auth environment: nodes by node-manager port, and every actor
# of the cluster (the GCS keeps finished jobs' actors) with its name and node.
CLUSTER_STATE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {node["NodeID"]: node["NodeManagerPort"] for node in ray.nodes() if node["Alive"]}
actors = [
    {"name": actor["Name"], "node_port": nodes.get(actor["Address"]["NodeID"]), "job": actor["JobID"]}
    for actor in ray._private.state.actors().values()
]
print(json.dumps({"node_ports": sorted(nodes.values()), "actors": actors}))
"""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on HOST a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayNode:
    """One `ray start --block` of the test: its process (own session and process group) and log."""

    process: subprocess.Popen
    log: Path
    node_manager_port: int
    spawned: set = field(default_factory=set)

    def remember_children(self) -> None:
        """Record every process this node spawned so far (raylet, GCS, agents, Ray workers), by id."""
        try:
            self.spawned.update(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> list[psutil.Process]:
        """SIGTERM the node's process group, then SIGKILL what is left of it and of its spawned processes.
        Returns the processes still alive afterwards."""
        self.remember_children()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL:
                for child in self.spawned:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
            _, alive = psutil.wait_procs(list(self.spawned), timeout=30)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if not alive and self.process.poll() is not None:
                break
        _, alive = psutil.wait_procs(list(self.spawned), timeout=5)
        return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def start_node(args: list[str], env: dict, ray_dir: Path, name: str) -> RayNode:
    ports = dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS))))
    port_args = [f"{option}={port}" for option, port in ports.items()]
    log = ray_dir / f"{name}.log"
    with open(log, "w") as out:
        # under CPU mode's /dev/shm cleaner: the vLLM engines of a cluster started apart from the run are the
        # node's descendants, not the driver's, so the run's own cleaner does not see their segments
        process = subprocess.Popen(
            [sys.executable, "-m", "tip_verl.cpu.shm", str(RAY), "start", "--block", *args, *port_args, f"--node-ip-address={HOST}",
             "--min-worker-port=0", "--max-worker-port=0", f"--num-cpus={NODE_CPUS}",
             "--object-store-memory=300000000", f"--temp-dir={ray_dir / name}", "--disable-usage-stats"],
            env=env, cwd=ray_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return RayNode(process, log, ports["--node-manager-port"])


def cluster_state(address: str, env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CLUSTER_STATE, address], env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for_nodes(address: str, env: dict, nodes: list[RayNode]) -> None:
    """Until the cluster lists exactly `nodes` alive; fail with a node's log if one exits."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    expected = sorted(node.node_manager_port for node in nodes)
    last_error = ""
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                pytest.fail(f"ray start exited {node.process.returncode}:\n{node.log.read_text()[-4000:]}")
        try:
            if cluster_state(address, env)["node_ports"] == expected:
                return
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
            last_error = str(error)
        time.sleep(2)
    pytest.fail(f"the cluster did not list {len(nodes)} nodes in {NODE_START_TIMEOUT_S} s: {last_error}")


@pytest.fixture(scope="module")
def two_node_cluster():
    """(address, auth environment, head, second node): a token-authenticated two-node cluster on HOST."""
    ray_dir = Path(tempfile.mkdtemp(prefix="tipray-"))  # short: Ray's socket paths live under it
    token_path = ray_dir / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    base_env.pop("VERL_FILE_LOGGER_PATH", None)  # only the job's runtime_env may bring it to the workers
    base_env["PATH"] = f"{RAY.parent}{os.pathsep}{base_env['PATH']}"
    node_env = {**base_env, **auth_env, **CPU_MODE_ENV, "PYTHONPATH": str(REPO_ROOT)}
    gcs_port, client_port = free_ports(2)
    address = f"{HOST}:{gcs_port}"
    nodes = []
    try:
        head = ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}", "--include-dashboard=false"]
        nodes.append(start_node([*head, f"--num-gpus={HEAD_GPUS}"], node_env, ray_dir, "head"))
        wait_for_nodes(address, {**base_env, **auth_env}, nodes)
        second = [f"--address={address}", f"--num-gpus={SECOND_NODE_GPUS}"]
        nodes.append(start_node(second, node_env, ray_dir, "second"))
        wait_for_nodes(address, {**base_env, **auth_env}, nodes)
        yield address, {**base_env, **auth_env}, nodes[0], nodes[1]
    finally:
        left = [process for node in reversed(nodes) for process in node.stop()]
        shutil.rmtree(ray_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray nodes still running: {left}"


@pytest.fixture(scope="module")
def two_node_run(two_node_cluster, tiny_dir, tmp_path_factory):
    """The tiny run with one trainer rank per node; returns (metrics by step, cluster state, seconds, node ports)."""
    address, auth_env, head, second = two_node_cluster
    out_dir = tmp_path_factory.mktemp("two_nodes")
    metrics_path = out_dir / "asked_for" / "metrics.jsonl"
    metrics_path.parent.mkdir()
    env = {
        **auth_env,
        "TINY_DIR": str(tiny_dir),
        "OUT_DIR": str(out_dir),
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
    }
    overrides = [
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=1",
        f"ray_kwargs.ray_init.address={address}",
        "ray_kwargs.ray_init.num_cpus=null",
        "ray_kwargs.ray_init.num_gpus=null",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH='{metrics_path}'",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.resume_mode=disable",
    ]
    log_path = out_dir / "run.log"
    started = time.monotonic()
    run_script(overrides, env, log_path)
    seconds = time.monotonic() - started
    head.remember_children()
    second.remember_children()
    assert metrics_path.exists(), f"no metrics at VERL_FILE_LOGGER_PATH; log: {log_path}"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = {record["step"]: record["data"] for record in records}
    return steps, cluster_state(address, auth_env), seconds, (head.node_manager_port, second.node_manager_port)


@pytest.mark.e2e
def test_metrics_reach_the_file_the_user_asked_for(two_node_run):
    steps, _, seconds, _ = two_node_run
    print(f"two-node run: {seconds:.0f} s")
    assert sorted(steps) == list(range(1, STEPS + 1))
    for metrics in steps.values():
        assert metrics["actor/grad_norm"] > 0.0
        assert 0.0 < metrics["tip/selected_fraction"] < 1.0, "tip_opd ran: the plugin loaded on the workers"
    assert steps[STEPS]["training/rollout_probs_diff_max"] < SYNCED_MAX_DIFF, "weights reached both nodes' rollouts"


@pytest.mark.e2e
def test_trainer_ranks_ran_on_both_nodes(two_node_run):
    _, state, _, node_ports = two_node_run
    assert sorted(state["node_ports"]) == sorted(node_ports), "the cluster is the test's own two nodes"
    # verl names a worker group's actors <prefix><class>_<placement group>:<bundle>; the trainer's (actor, rollout,
    # reference) is the colocated WorkerDict group; with one GPU per placement group per node, placement group 0
    # holds rank 0 and placement group 1 rank 1.
    trainer_actors = [a for a in state["actors"] if TRAINER_WORKERS in a["name"] and "teacher" not in a["name"]]
    ranks = {actor["name"].rsplit("_", 1)[1]: actor["node_port"] for actor in trainer_actors}
    print(f"trainer ranks by node-manager port: {ranks}; head {node_ports[0]}, second node {node_ports[1]}")
    assert len(trainer_actors) == 2 and sorted(ranks) == ["0:0", "1:0"], [a["name"] for a in state["actors"]]
    assert sorted(ranks.values()) == sorted(node_ports), "one trainer rank on each node"
