"""KServe Open Inference Protocol v2 tensors <-> generation requests (pure; no sockets, no torch).

Parses a ModelInferRequest (typed `contents` or `raw_input_contents`) into prompts and sampling
parameters, and builds the ModelInferResponse. Every problem raises InvalidRequest naming the field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from moe_runtime.api.inference import grpc_service_pb2 as pb
from moe_runtime.errors import InvalidRequest
from moe_runtime.generate import SamplingParams

INPUT_IDS, TEXT_INPUT = "input_ids", "text_input"
OUTPUT_IDS, TEXT_OUTPUT = "output_ids", "text_output"
PAD_ID = -1  # output_ids rows are padded to the longest completion with this id
_ID_DTYPES = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "contrast_alpha")


@dataclass(frozen=True)
class InferCall:
    """One parsed ModelInfer: a prompt per batch row (ids or text) and shared sampling parameters."""

    prompts: list[list[int] | str]
    params: SamplingParams
    stop: tuple[str, ...]
    text: bool  # the request sent text_input (so text_output is expected)


def parse_infer_request(req: pb.ModelInferRequest, default_max_tokens: int) -> InferCall:
    if not req.inputs:
        raise InvalidRequest(f"inputs: expected one tensor named {INPUT_IDS!r} or {TEXT_INPUT!r}")
    if len(req.inputs) != 1:
        names = [t.name for t in req.inputs]
        raise InvalidRequest(f"inputs: expected exactly one of {INPUT_IDS!r}/{TEXT_INPUT!r}, got {names}")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidRequest(f"raw_input_contents: {len(req.raw_input_contents)} buffers for "
                             f"{len(req.inputs)} inputs")
    tensor = req.inputs[0]
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    if tensor.name == INPUT_IDS:
        prompts: list[list[int] | str] = [list(map(int, row)) for row in _ids(tensor, raw)]
    elif tensor.name == TEXT_INPUT:
        prompts = _texts(tensor, raw)
    else:
        raise InvalidRequest(f"inputs[0].name: unknown input {tensor.name!r}; expected "
                             f"{INPUT_IDS!r} or {TEXT_INPUT!r}")
    for i, out in enumerate(req.outputs):
        if out.name not in (OUTPUT_IDS, TEXT_OUTPUT):
            raise InvalidRequest(f"outputs[{i}].name: unknown output {out.name!r}; expected "
                                 f"{OUTPUT_IDS!r} or {TEXT_OUTPUT!r}")
    params, stop = parse_parameters(req.parameters, default_max_tokens)
    return InferCall(prompts, params, stop, text=tensor.name == TEXT_INPUT)


def _ids(tensor, raw: bytes | None) -> np.ndarray:
    dtype = _ID_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidRequest(f"inputs[{INPUT_IDS}].datatype: expected INT32 or INT64, got {tensor.datatype!r}")
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InvalidRequest(f"inputs[{INPUT_IDS}].shape: expected [batch, seq] with both >= 1, got {shape}")
    if raw is not None:
        if len(raw) % dtype.itemsize:
            raise InvalidRequest(f"raw_input_contents[0]: {len(raw)} bytes is not a whole number of {tensor.datatype}")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = tensor.contents.int_contents if tensor.datatype == "INT32" else tensor.contents.int64_contents
        values = np.asarray(list(field), dtype=np.int64)
    if values.size != shape[0] * shape[1]:
        raise InvalidRequest(f"inputs[{INPUT_IDS}]: {values.size} values do not fill shape {shape}")
    return values.reshape(shape)


def _texts(tensor, raw: bytes | None) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"inputs[{TEXT_INPUT}].datatype: expected BYTES, got {tensor.datatype!r}")
    shape = list(tensor.shape)
    if not (len(shape) in (1, 2) and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)):
        raise InvalidRequest(f"inputs[{TEXT_INPUT}].shape: expected [batch] or [batch, 1], got {shape}")
    items = _unpack_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(items) != shape[0]:
        raise InvalidRequest(f"inputs[{TEXT_INPUT}]: {len(items)} strings for batch {shape[0]}")
    try:
        return [b.decode("utf-8") for b in items]
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"inputs[{TEXT_INPUT}]: not UTF-8 ({exc})") from exc


def _unpack_bytes(raw: bytes) -> list[bytes]:
    """BYTES raw layout: each element is a 4-byte little-endian length, then the bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidRequest("raw_input_contents[0]: truncated BYTES length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InvalidRequest("raw_input_contents[0]: BYTES element overruns the buffer")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _param(params, name: str, kind: type):
    """A parameter as `kind`: clients send numbers as int64, double or string (tritonclient has no float)."""
    p = params[name]
    which = p.WhichOneof("parameter_choice")
    value = getattr(p, which) if which else None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value) if not (kind is int and isinstance(value, str)) else int(value, 10)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"parameters[{name}]: expected {kind.__name__}, got {value!r}") from exc


def parse_parameters(params, default_max_tokens: int) -> tuple[SamplingParams, tuple[str, ...]]:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise InvalidRequest(f"parameters[{unknown[0]}]: unknown parameter (known: {', '.join(_PARAMS)})")
    get = lambda n, k, d: _param(params, n, k) if n in params else d  # noqa: E731
    stop = get("stop", str, "")
    sampling = SamplingParams(
        max_new_tokens=get("max_tokens", int, default_max_tokens),
        temperature=get("temperature", float, 0.0),
        top_p=get("top_p", float, 1.0),
        seed=get("seed", int, None),
        ignore_eos=get("ignore_eos", bool, False),
        contrast_alpha=get("contrast_alpha", float, 0.0),
    )
    return sampling, ((stop,) if stop else ())


def build_infer_response(model_name: str, request_id: str, outputs: list[list[int]],
                         texts: list[str] | None) -> pb.ModelInferResponse:
    width = max((len(o) for o in outputs), default=0)
    ids = np.full((len(outputs), width), PAD_ID, dtype="<i8")
    for row, out in enumerate(outputs):
        ids[row, : len(out)] = out
    resp = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request_id)
    resp.outputs.add(name=OUTPUT_IDS, datatype="INT64", shape=list(ids.shape))
    resp.raw_output_contents.append(ids.tobytes())
    if texts is not None:
        resp.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[len(texts)])
        resp.raw_output_contents.append(pack_bytes([t.encode("utf-8") for t in texts]))
    return resp
