from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Options(_message.Message):
    __slots__ = ("binary_name", "root", "systemd_cgroup", "shim_cgroup", "io_uid", "io_gid", "isolation", "vm", "debug", "allowed_isolation", "host")
    BINARY_NAME_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    SYSTEMD_CGROUP_FIELD_NUMBER: _ClassVar[int]
    SHIM_CGROUP_FIELD_NUMBER: _ClassVar[int]
    IO_UID_FIELD_NUMBER: _ClassVar[int]
    IO_GID_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ISOLATION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    binary_name: str
    root: str
    systemd_cgroup: bool
    shim_cgroup: str
    io_uid: int
    io_gid: int
    isolation: str
    vm: VMOptions
    debug: bool
    allowed_isolation: _containers.RepeatedScalarFieldContainer[str]
    host: HostOptions
    def __init__(self, binary_name: _Optional[str] = ..., root: _Optional[str] = ..., systemd_cgroup: bool = ..., shim_cgroup: _Optional[str] = ..., io_uid: _Optional[int] = ..., io_gid: _Optional[int] = ..., isolation: _Optional[str] = ..., vm: _Optional[_Union[VMOptions, _Mapping]] = ..., debug: bool = ..., allowed_isolation: _Optional[_Iterable[str]] = ..., host: _Optional[_Union[HostOptions, _Mapping]] = ...) -> None: ...

class HostOptions(_message.Message):
    __slots__ = ("allowed_rootfs_locations",)
    ALLOWED_ROOTFS_LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    allowed_rootfs_locations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allowed_rootfs_locations: _Optional[_Iterable[str]] = ...) -> None: ...

class VMOptions(_message.Message):
    __slots__ = ("memory_mib", "vcpus", "kernel_path", "initrd_path", "max_memory_mib", "max_vcpus", "template", "tcg_tb_size_mib")
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_PATH_FIELD_NUMBER: _ClassVar[int]
    INITRD_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPUS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TCG_TB_SIZE_MIB_FIELD_NUMBER: _ClassVar[int]
    memory_mib: int
    vcpus: int
    kernel_path: str
    initrd_path: str
    max_memory_mib: int
    max_vcpus: int
    template: bool
    tcg_tb_size_mib: int
    def __init__(self, memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., kernel_path: _Optional[str] = ..., initrd_path: _Optional[str] = ..., max_memory_mib: _Optional[int] = ..., max_vcpus: _Optional[int] = ..., template: bool = ..., tcg_tb_size_mib: _Optional[int] = ...) -> None: ...
