"""Pydantic models of settings sections, kept apart from pydantic-settings' machinery."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from checks.units import Duration, Period


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class CheckSettings(BaseModel):
    """Per-check settings. Keys other than these three are the check's own options."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    enabled: bool | None = None
    interval: Duration | None = None
    timeout: Duration | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class NodeKeys(Strict):
    """Label, taint and annotation names the agent writes (HyperPod's by default)."""

    health_status_label: str = Field(
        "sagemaker.amazonaws.com/node-health-status", description="the verdict's label"
    )
    deep_health_check_label: str = Field(
        "sagemaker.amazonaws.com/deep-health-check-status",
        description="the deep check's label: InProgress, Passed, Failed",
    )
    taint_key: str = Field(
        "sagemaker.amazonaws.com/node-health-status",
        description="the NoSchedule taint's key while the node is unschedulable",
    )
    fault_details_annotation: str = Field(
        "sagemaker.amazonaws.com/fault-details",
        description="the active faults, a JSON array of {timestamp,type,reason,message}",
    )
    fault_types_label: str = Field(
        "sagemaker.amazonaws.com/fault-types", description="the active faults' condition types"
    )
    fault_reasons_label: str = Field(
        "sagemaker.amazonaws.com/fault-reasons", description="the active faults' reasons"
    )
    # Our own keys.
    owned_annotation: str = Field(
        "node-health-agent.io/owned",
        description="what the agent wrote last, so it removes only its own keys and knows a "
        "label set by hand",
    )
    remediation_annotation: str = Field(
        "node-health-agent.io/remediation",
        description="the operator's switch for one node: `off` reports only",
    )
    deep_check_request_annotation: str = Field(
        "node-health-agent.io/deep-check", description="a deep check asked for: run, force"
    )
    connectivity_request_annotation: str = Field(
        "node-health-agent.io/connectivity-request",
        description="a multi-node connectivity check asked of the controller (any value); "
        "removed with the result",
    )
    connectivity_result_annotation: str = Field(
        "node-health-agent.io/connectivity", description="the connectivity check's result, JSON"
    )
    hardware_annotation: str = Field(
        "node-health-agent.io/hardware",
        description="the hardware history's summary, JSON: GPU UUIDs and serials, NIC GUIDs, "
        "Neuron device serials, their fault and reboot counts (the controller matches serials "
        "it replaced)",
    )
    performance_annotation: str = Field(
        "node-health-agent.io/performance",
        description="the last deep check's performance figures, JSON (compared by the "
        "controller with the node's peers of its instance type)",
    )
    remediation_step_label: str = Field(
        "node-health-agent.io/remediation-step",
        description="the controller's: where a node is in its remediation",
    )
    remediation_state_annotation: str = Field(
        "node-health-agent.io/remediation-state",
        description="the controller's record that lets a restarted controller carry on, JSON",
    )
    replaced_hardware_label: str = Field(
        "node-health-agent.io/replaced-hardware",
        description="the controller's: the node carries hardware it had replaced for a fault",
    )
    performance_label: str = Field(
        "node-health-agent.io/performance-status",
        description="the controller's: Degraded while the node's figures are an outlier "
        "among its peers",
    )


class SpoolSettings(Strict):
    """The local spool every event is written to first (what CloudWatch ships from)."""

    max_segment_bytes: int = Field(
        8 * 1024 * 1024, ge=4096, description="one segment's size; the spool is bounded"
    )
    max_segments: int = Field(
        8, ge=2, description="segments kept; past them the oldest goes, counted and logged"
    )


class DeepCheckSettings(Strict):
    """The deep health check the daemon runs itself (see `node-health deep-check`)."""

    on_first_start: bool = Field(
        False,
        description="the daemon runs the deep check once on a node that has none on record "
        "(`<state_dir>/deep-health-check`), after its first round of checks and once nothing "
        "uses the accelerators; a failure goes through the policy like any finding",
    )
    after_remediation: bool = Field(
        False,
        description="after the reboot that remediated a fault, the node stays `Unschedulable` "
        "(deep-health-check-status `InProgress`) until the deep check is done: `Passed` lets "
        "it back, `Failed` takes it out again; a run that cannot judge leaves it to the policy",
    )
    suite: str = Field(
        "stress",
        pattern="^(stress|all)$",
        description="what it runs, as `node-health deep-check`: stress, or all (adds the EFA "
        "devices and loopback)",
    )
    level: int = Field(2, ge=1, le=4, description="dcgmi diag level")
    deadline: Duration = Field(4 * 3600.0, description="time for the whole run")
    idle_wait: Duration = Field(
        60.0, description="how long to wait before looking again while the accelerators are busy"
    )
    runner: str = Field(
        "agent",
        pattern="^(agent|job)$",
        description="who runs a deep check asked for (the node annotation, a new node): the "
        "agent in its own pod, or the controller as a Job on the node from `image`; set it "
        "alike for the agent and the controller",
    )
    image: str = Field(
        "node-health-agent-deep-check",
        description="runner job: the image with the deep check's tools (the Dockerfile's "
        "`deep-check` target)",
    )


class KubernetesSettings(Strict):
    """The agent's own Node through the API server (the node writer in a cluster)."""

    enabled: bool | None = Field(
        None, description="unset: when running in a pod (KUBERNETES_SERVICE_HOST is set)"
    )
    kubeconfig: str | None = Field(None, description="a kubeconfig file; else in-cluster")
    events_namespace: str = Field("default", description="where Node events go, as kubelet's")
    request_timeout: Duration = Field(10.0, description="one API request, connect and read")
    max_unschedulable: int | None = Field(
        None,
        ge=0,
        description="breaker: take no node out beyond this many unschedulable",
        examples=[20],
    )
    max_unschedulable_percent: float | None = Field(
        None,
        ge=0,
        le=100,
        description="breaker: nor beyond this share (percent) of the agent's nodes",
        examples=[10],
    )
    write_alarm: Duration = Field(
        300.0, description="/readyz fails while the health label and taint fail this long"
    )


class CloudWatchSettings(Strict):
    """Shipping events to CloudWatch Logs, in HyperPod's log group and streams."""

    enabled: bool | None = Field(
        None, description="unset: when cluster_name and cluster_id are known"
    )
    log_group: str | None = Field(
        None, description="default /aws/sagemaker/Clusters/<cluster_name>/<cluster_id>"
    )
    region: str | None = Field(None, description="default: the node's region, else boto3's")
    flush_interval: Duration = Field(
        1.0,
        description="in a burst, one batch this often; after an idle spell an event goes at once",
    )
    request_timeout: Duration = Field(10.0, description="one AWS request, connect and read")


class MqttSettings(Strict):
    """Events to an MQTT broker, a retained status, and commands from it (aiomqtt)."""

    host: str | None = Field(None, description="the broker; unset: no MQTT")
    port: int = Field(1883, ge=1, le=65535, description="the broker's port")
    prefix: str = Field("node-health", description="topics: <prefix>/<cluster>/<node>/...")
    username: str | None = Field(None, description="to log in to the broker")
    password: str | None = Field(None, description="better from NODE_HEALTH_MQTT__PASSWORD")
    tls: bool = Field(False, description="TLS to the broker")
    ca_file: str | None = Field(None, description="TLS: the CA bundle that signed the broker's")
    cert_file: str | None = Field(None, description="TLS: a client certificate")
    key_file: str | None = Field(None, description="TLS: the client certificate's key")
    keepalive: int = Field(30, ge=1, description="seconds; the broker calls us gone after 1.5x")
    buffer: int = Field(10_000, ge=1, description="events kept while the broker is away")


# As in aws-samples/awsome-distributed-training's nccl-tests MPIJob for EKS (EFA, GPUDirect).
LAUNCHER = [
    "mpirun",
    "--allow-run-as-root",
    "-np",
    "{ranks}",
    "-N",
    "{gpus}",
    "-x",
    "FI_PROVIDER=efa",
    "-x",
    "FI_EFA_USE_DEVICE_RDMA=1",
    "-x",
    "NCCL_DEBUG=WARN",
    "/opt/nccl-tests/build/all_reduce_perf",
    "-b",
    "8",
    "-e",
    "{size}",
    "-f",
    "2",
    "-g",
    "1",
]


class ConnectivitySettings(Strict):
    """The multi-node deep check: NCCL all-reduce across pairs of nodes, as MPIJobs (the
    Kubeflow MPI Operator's kubeflow.org/v2beta1, which must be installed)."""

    image: str = Field(
        "public.ecr.aws/hpc-cloud/nccl-tests:latest",
        description="nccl-tests built with MPI, EFA's libfabric and aws-ofi-nccl",
    )
    command: list[str] = Field(
        default_factory=lambda: list(LAUNCHER),
        description="the launcher's command; {ranks}, {gpus} and {size} are filled in",
        json_schema_extra={"default_text": "nccl-tests' `all_reduce_perf` by `mpirun` over EFA"},
    )
    namespace: str = Field("node-health", description="where the MPIJobs run")
    max_share: float = Field(
        0.1, gt=0, le=1, description="at most this share of the fleet under test at once"
    )
    timeout: Duration = Field(1800.0, description="one pair's test, start to result")
    poll: Duration = Field(5.0, description="between looks at a running test")
    new_nodes: bool = Field(
        False, description="the controller tests nodes new to the cluster, as HyperPod can"
    )


class TopologySettings(Strict):
    """Several nodes under one network node with network faults: the network is suspected,
    and their remediation held."""

    labels: list[str] = Field(
        default_factory=lambda: [
            "topology.k8s.aws/network-node-layer-4",
            "topology.k8s.aws/network-node-layer-3",
        ],
        description="the nodes' network-node labels, most selective first (EKS's bottom "
        "layers); [] turns this off",
    )
    min_nodes: int = Field(3, ge=2, description="nodes with network faults under one network node")
    window: Duration = Field(3600.0, description="how recent their faults must be")
    fault_types: list[str] = Field(
        default_factory=lambda: ["Efa*", "Network*", "InfiniBand*", "InstanceConnectivity"],
        description="fault types (fnmatch patterns) that are network-class",
    )


class StragglerSettings(Strict):
    """Each node's deep-check figures against its peers of the same instance type: an
    outlier is `min_drop` worse than their median and beyond `mads` median absolute
    deviations from it."""

    min_drop: float = Field(0.10, gt=0, lt=1, description="share worse than the median")
    mads: float = Field(3.0, gt=0, description="and this many MADs from it")
    min_peers: int = Field(4, ge=3, description="nodes of a type with the figure, to compare")


class ControllerSettings(Strict):
    """`node-health controller`: acts on the health labels (drain, then reboot or replace)."""

    backend: str = Field(
        "none", pattern="^(sagemaker|ec2|none)$", description="who reboots or replaces a node"
    )
    namespace: str = Field("node-health", description="where its Lease lives")
    lease_name: str = Field("node-health-controller", description="its Lease, for one leader")
    lease_duration: Duration = Field(15.0, description="a leader that stops renewing is gone after")
    renew_deadline: Duration = Field(10.0, description="a leader that cannot renew stops acting")
    retry_period: Duration = Field(2.0, description="between tries to renew or take the Lease")
    interval: Duration = Field(5.0, description="between passes over the nodes")
    concurrent: int = Field(1, ge=0, description="nodes in remediation at once")
    per_hour: int = Field(4, ge=0, description="remediations started in any hour")
    concurrent_percent: float | None = Field(
        None, ge=0, le=100, description="nor more than this share of the agents' nodes at once"
    )
    drain_timeout: Duration = Field(
        900.0, description="after this, a drain still blocked is reported, not forced"
    )
    force: bool = Field(
        False, description="act when the drain deadline passes even though pods remain"
    )
    eviction_grace: int | None = Field(
        None, ge=0, description="seconds each evicted pod gets; unset: the pod's own"
    )
    reboot_timeout: Duration = Field(1800.0, description="no reboot seen after this: failed")
    replace_timeout: Duration = Field(3600.0, description="node still here after this: failed")
    settle: Duration = Field(
        900.0, description="after a reboot, how long the node's agent has to decide"
    )
    retry_interval: Duration = Field(600.0, description="before asking the backend again")
    reboots_before_replace: int = Field(
        1, ge=0, description="a node that needs a reboot again after this many is replaced"
    )
    scan: Period = Field(
        60.0,
        description="between looks at every node (connectivity asked for, new nodes); 0: never",
    )
    deep_check_new_nodes: bool = Field(
        True,
        description="ask the agent of a new node (a replacement, say) for its deep check",
    )
    new_within: Duration = Field(
        3600.0, description="a node this young is new (and never checked: no result on it)"
    )
    replaced_record: str = Field(
        "node-health-replaced-hardware",
        description="the ConfigMap (in `namespace`) of hardware replaced for a fault",
    )
    connectivity: ConnectivitySettings = ConnectivitySettings()
    topology: TopologySettings = TopologySettings()
    stragglers: StragglerSettings = StragglerSettings()
