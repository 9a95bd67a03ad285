from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecInfo(_message.Message):
    __slots__ = ("id", "pid", "state", "exit_status", "terminal", "created_at", "started_at", "exited_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    state: str
    exit_status: int
    terminal: bool
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    exited_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., exit_status: _Optional[int] = ..., terminal: bool = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., exited_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("id", "bundle", "kind", "name", "init", "execs")
    ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    EXECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    bundle: str
    kind: str
    name: str
    init: ExecInfo
    execs: _containers.RepeatedCompositeFieldContainer[ExecInfo]
    def __init__(self, id: _Optional[str] = ..., bundle: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., init: _Optional[_Union[ExecInfo, _Mapping]] = ..., execs: _Optional[_Iterable[_Union[ExecInfo, _Mapping]]] = ...) -> None: ...

class PodInfo(_message.Message):
    __slots__ = ("id", "name", "namespace", "uid", "isolation")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    namespace: str
    uid: str
    isolation: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., uid: _Optional[str] = ..., isolation: _Optional[str] = ...) -> None: ...

class ShimInfo(_message.Message):
    __slots__ = ("pid", "version", "namespace", "containerd_address", "socket", "started_at", "rss_bytes", "pss_bytes", "cpu_seconds", "vm_pid", "vm_rss_bytes", "vm_pss_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINERD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VM_PID_FIELD_NUMBER: _ClassVar[int]
    VM_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    VM_PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    version: str
    namespace: str
    containerd_address: str
    socket: str
    started_at: _timestamp_pb2.Timestamp
    rss_bytes: int
    pss_bytes: int
    cpu_seconds: float
    vm_pid: int
    vm_rss_bytes: int
    vm_pss_bytes: int
    def __init__(self, pid: _Optional[int] = ..., version: _Optional[str] = ..., namespace: _Optional[str] = ..., containerd_address: _Optional[str] = ..., socket: _Optional[str] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., rss_bytes: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., vm_pid: _Optional[int] = ..., vm_rss_bytes: _Optional[int] = ..., vm_pss_bytes: _Optional[int] = ...) -> None: ...

class TasksResponse(_message.Message):
    __slots__ = ("shim", "pod", "tasks")
    SHIM_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    shim: ShimInfo
    pod: PodInfo
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    def __init__(self, shim: _Optional[_Union[ShimInfo, _Mapping]] = ..., pod: _Optional[_Union[PodInfo, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ...) -> None: ...

class StacksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StacksResponse(_message.Message):
    __slots__ = ("shim", "guest", "guest_error")
    SHIM_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    GUEST_ERROR_FIELD_NUMBER: _ClassVar[int]
    shim: str
    guest: str
    guest_error: str
    def __init__(self, shim: _Optional[str] = ..., guest: _Optional[str] = ..., guest_error: _Optional[str] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("args", "env", "tty", "stdio_socket", "width", "height")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    STDIO_SOCKET_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    stdio_socket: str
    width: int
    height: int
    def __init__(self, args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., tty: bool = ..., stdio_socket: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("exit_code", "where")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    where: str
    def __init__(self, exit_code: _Optional[int] = ..., where: _Optional[str] = ...) -> None: ...

class ShareRequest(_message.Message):
    __slots__ = ("host_path", "guest_path", "writable")
    HOST_PATH_FIELD_NUMBER: _ClassVar[int]
    GUEST_PATH_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    host_path: str
    guest_path: str
    writable: bool
    def __init__(self, host_path: _Optional[str] = ..., guest_path: _Optional[str] = ..., writable: bool = ...) -> None: ...

class ShareResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sample(_message.Message):
    __slots__ = ("labels", "value", "bucket_bounds", "bucket_counts", "count")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    value: float
    bucket_bounds: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    count: int
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., bucket_bounds: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., count: _Optional[int] = ...) -> None: ...

class MetricFamily(_message.Message):
    __slots__ = ("name", "help", "type", "samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    help: str
    type: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, name: _Optional[str] = ..., help: _Optional[str] = ..., type: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("families",)
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    families: _containers.RepeatedCompositeFieldContainer[MetricFamily]
    def __init__(self, families: _Optional[_Iterable[_Union[MetricFamily, _Mapping]]] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("after",)
    AFTER_FIELD_NUMBER: _ClassVar[int]
    after: int
    def __init__(self, after: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("seq", "text")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    text: str
    def __init__(self, seq: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class LogsResponse(_message.Message):
    __slots__ = ("lines", "dropped")
    LINES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    dropped: int
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class PidRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PidResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("version", "runtime", "python")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    version: str
    runtime: str
    python: str
    def __init__(self, version: _Optional[str] = ..., runtime: _Optional[str] = ..., python: _Optional[str] = ...) -> None: ...
