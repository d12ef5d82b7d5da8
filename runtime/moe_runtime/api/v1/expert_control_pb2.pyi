import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetExpertLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("timestamp", "start_time", "placement_version", "num_layers", "num_ranks", "slots_per_rank", "ranks")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    timestamp: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    placement_version: int
    num_layers: int
    num_ranks: int
    slots_per_rank: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankLoad]
    def __init__(self, timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., placement_version: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_ranks: _Optional[int] = ..., slots_per_rank: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankLoad, _Mapping]]] = ...) -> None: ...

class RankLoad(_message.Message):
    __slots__ = ("rank", "slot_counts")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    slot_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rank: _Optional[int] = ..., slot_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("version", "num_ranks", "slots_per_rank", "layers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_ranks: int
    slots_per_rank: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerSlots]
    def __init__(self, version: _Optional[int] = ..., num_ranks: _Optional[int] = ..., slots_per_rank: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerSlots, _Mapping]]] = ...) -> None: ...

class LayerSlots(_message.Message):
    __slots__ = ("experts", "shares")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    shares: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, experts: _Optional[_Iterable[int]] = ..., shares: _Optional[_Iterable[float]] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApplyPlacementRequest(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class ApplyPlacementResponse(_message.Message):
    __slots__ = ("version", "unchanged", "copied_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    COPIED_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    unchanged: bool
    copied_bytes: int
    def __init__(self, version: _Optional[int] = ..., unchanged: _Optional[bool] = ..., copied_bytes: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout",)
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    timeout: _duration_pb2.Duration
    def __init__(self, timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight", "drained")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    drained: bool
    def __init__(self, in_flight: _Optional[int] = ..., drained: _Optional[bool] = ...) -> None: ...
