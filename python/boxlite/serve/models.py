"""Request and response bodies. They define the OpenAPI document (``GET /openapi.json``):
requests refuse unknown fields, responses allow fields a newer core adds."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: Text passed on to the core: no NUL (it cannot cross into a C string), bounded.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=4096)]
Port = Annotated[int, Field(ge=0, le=65535)]
TermSize = Annotated[int, Field(ge=1, le=65535)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="the boxlite exception class name, e.g. BoxNotFoundError")
    code: str = Field(description="the class's stable code, e.g. not_found")


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------- boxes


class Volume(Request):
    host_path: Text
    guest_path: Text
    read_only: bool = False


class Network(Request):
    mode: Text | None = Field(None, description='"enabled" (default) or "disabled"')
    allow_net: list[Text] = Field(default_factory=list, max_length=1024)


class PortSpec(Request):
    host_port: Port = 0
    guest_port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Text = "tcp"
    host_ip: Text | None = None


class CreateBox(Request):
    name: Text | None = None
    image: Text | None = None
    rootfs_path: Text | None = Field(None, description="a server path: needs --allow-host-paths")
    cpus: Annotated[int, Field(ge=1, le=1024)] | None = None
    memory_mib: Annotated[int, Field(ge=1, le=1 << 22)] | None = None
    disk_size_gb: Annotated[float, Field(gt=0, le=1 << 16, allow_inf_nan=False)] | None = None
    working_dir: Text | None = None
    env: dict[Text, Text] = Field(default_factory=dict)
    entrypoint: list[Text] | None = None
    cmd: list[Text] | None = None
    user: Text | None = None
    tty: bool | None = None
    volumes: list[Volume] | None = Field(None, description="server paths: need --allow-host-paths")
    network: Network | None = None
    ports: list[PortSpec] | None = None
    auto_remove: bool | None = None
    detach: bool | None = None


class PublishedPort(Reply):
    host_ip: str
    host_port: int
    guest_port: int
    protocol: str


class NetworkInfo(Reply):
    mode: str
    allow_net: list[str]
    published_ports: list[PublishedPort]


class BoxInfo(Reply):
    box_id: str
    id: str
    name: str | None
    status: str
    running: bool
    pid: int | None
    exit_code: int | None
    image: str
    cpus: int
    memory_mib: int
    created_at: str
    updated_at: str | None
    started_at: str | None
    accelerator: str
    hardware_isolated: bool
    detach: bool
    auto_remove: bool
    labels: dict[str, str]
    network: NetworkInfo


class Box(BoxInfo):
    default_command: list[str] = Field(description="what exec with command null runs")


class BoxList(Reply):
    boxes: list[BoxInfo]


# ---------------------------------------------------------------------------- executions


class ExecRequest(Request):
    command: Text | None = Field(None, description="null runs the box's default command")
    args: list[Text] = Field(default_factory=list)
    env: dict[Text, Text] = Field(default_factory=dict)
    working_dir: Text | None = None
    user: Text | None = None
    tty: bool = False
    tty_rows: TermSize = 24
    tty_cols: TermSize = 80
    timeout_seconds: Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)] | None = None
    stdin: str | None = Field(None, description="written to the command's stdin, then end-of-file")


class ExecStarted(Reply):
    execution_id: str
    pid: int


class ExecResult(Reply):
    exit_code: int
    signal: int | None
    error_message: str | None
    timed_out: bool


class ExecStatus(Reply):
    execution_id: str
    pid: int
    status: str = Field(description='"running" or "exited"')
    result: ExecResult | None
    output_dropped_bytes: int = Field(0, description="output over the backlog cap before the first attach")


class Signal(Request):
    signal: Annotated[int, Field(ge=1, le=64)]


class Resize(Request):
    rows: TermSize
    cols: TermSize


# ---------------------------------------------------------------------------- images, metrics, server


class ImageInfo(Reply):
    reference: str


class ImageList(Reply):
    images: list[ImageInfo]


class Pull(Request):
    reference: Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", min_length=1, max_length=4096)]


class RuntimeMetrics(Reply):
    boxes_created_total: int
    num_running_boxes: int


class BoxMetrics(Reply):
    commands_run_total: int


class Capabilities(Reply):
    snapshots_enabled: bool
    clone_enabled: bool
    export_enabled: bool
    import_enabled: bool
    host_paths_enabled: bool
    exec_session: bool = Field(False, description="GET /v1/default/session carries commands (docs/serve.md)")


class ServerConfig(Reply):
    version: str
    capabilities: Capabilities
    limits: dict[str, int | float]


class Me(Reply):
    key: str
    boxes: int
    limits: dict[str, int | float]


class Health(Reply):
    status: str
