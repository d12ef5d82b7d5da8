"""The protocol definitions and their committed stubs: fresh, as published, spoken by a real client.

tritonclient's generated `inference` protos and ours cannot live in one descriptor pool ("duplicate symbol
'inference.ServerLiveRequest'"), so everything that imports tritonclient runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np

from moe_runtime.api.inference import grpc_service_pb2 as oip
from moe_runtime.api.inference import grpc_service_pb2_grpc as oip_grpc
from moe_runtime.api.v1 import expert_control_pb2, generation_pb2

ROOT = Path(__file__).resolve().parents[2]
API = Path("moe_runtime", "api")
REGENERATE = "make protos  (or: .venv/bin/python scripts/gen_protos.py)"

# The standard OIP v2 RPCs, in the published order, and every field of their messages, as published in
# kserve/kserve docs/predict-api/v2/grpc_predict_v2.proto (InferParameter's 4 and 5 are Triton's).
OIP_METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}
OIP_FIELDS = {
    "ServerLiveRequest": {},
    "ServerLiveResponse": {"live": 1},
    "ServerReadyRequest": {},
    "ServerReadyResponse": {"ready": 1},
    "ModelReadyRequest": {"name": 1, "version": 2},
    "ModelReadyResponse": {"ready": 1},
    "ServerMetadataRequest": {},
    "ServerMetadataResponse": {"name": 1, "version": 2, "extensions": 3},
    "ModelMetadataRequest": {"name": 1, "version": 2},
    "ModelMetadataResponse": {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
    "ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
    "ModelInferRequest": {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    },
    "ModelInferRequest.InferInputTensor": {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    },
    "ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
    "ModelInferResponse": {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    },
    "InferParameter": {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    },
    "InferTensorContents": {
        "bool_contents": 1,
        "int_contents": 2,
        "int64_contents": 3,
        "uint_contents": 4,
        "uint64_contents": 5,
        "fp32_contents": 6,
        "fp64_contents": 7,
        "bytes_contents": 8,
    },
}

# Prints, as JSON, the shape of every message and of the standard RPCs in a module's OIP descriptor.
DESCRIBE = """
import json, sys
from importlib import import_module

def fields(d):
    return {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None,
                     f.containing_oneof.name if f.containing_oneof else None] for f in d.fields}

def walk(d):
    yield d
    for n in d.nested_types:
        yield from walk(n)

fd = import_module(sys.argv[1]).DESCRIPTOR
service = fd.services_by_name["GRPCInferenceService"]
print(json.dumps({
    "messages": {m.full_name: fields(m) for t in fd.message_types_by_name.values() for m in walk(t)},
    "methods": {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                         m.server_streaming] for m in service.methods if m.name in sys.argv[2:]},
}))
"""

TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(url=sys.argv[1])
live = client.is_server_live(client_timeout=10)
input_ids = grpcclient.InferInput("input_ids", [1, 3], "INT64")
input_ids.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int64))
result = client.infer("tiny", [input_ids], request_id="r1", priority=3, client_timeout=10,
                      parameters={"max_tokens": 4, "stop": "\\n", "ignore_eos": True})
print(json.dumps({"live": live, "id": result.get_response().id,
                  "output_ids": result.as_numpy("output_ids").tolist()}))
"""


def _python(code: str, *args: str, timeout: float = 60) -> str:
    """Runs `python -c code args` with moe_runtime importable; returns its stdout."""
    path = [str(ROOT / "runtime"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _field_numbers(file) -> dict[str, dict[str, int]]:
    """{message: {field: number}} for every message of a file, nested ones included, map entries left out."""
    numbers, todo = {}, list(file.message_types_by_name.values())
    while todo:
        message = todo.pop()
        if not message.GetOptions().map_entry:
            numbers[message.full_name] = {f.name: f.number for f in message.fields}
        todo.extend(message.nested_types)
    return numbers


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh, committed = _files(tmp_path / API), _files(ROOT / "runtime" / API)
    assert fresh, "the generator wrote nothing"
    differ = sorted(
        (fresh.keys() ^ committed.keys())
        | {k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k]}
    )
    assert not differ, (
        f"runtime/moe_runtime/api is stale ({', '.join(differ)}): run `{REGENERATE}` and commit the result "
        f"(stubs are generated with the pinned grpcio-tools; this venv has {version('grpcio-tools')})"
    )


def test_oip_package_service_and_methods_are_as_published():
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert oip.DESCRIPTOR.package == "inference"
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == list(OIP_METHODS)
    for method in service.methods:
        request, response = OIP_METHODS[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            f"inference.{request}",
            f"inference.{response}",
        )
        assert not method.client_streaming and not method.server_streaming


def test_oip_field_names_and_numbers_are_as_published():
    request = oip.ModelInferRequest.DESCRIPTOR
    assert request.fields_by_name["raw_input_contents"].number == 7
    assert oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    assert request.fields_by_name["inputs"].number == 5
    parameters = request.fields_by_name["parameters"]
    assert parameters.number == 4
    assert parameters.message_type.GetOptions().map_entry
    assert (
        parameters.message_type.fields_by_name["value"].message_type.full_name == "inference.InferParameter"
    )
    assert [o.name for o in oip.InferParameter.DESCRIPTOR.oneofs] == ["parameter_choice"]
    assert _field_numbers(oip.DESCRIPTOR) == {f"inference.{name}": f for name, f in OIP_FIELDS.items()}


def test_oip_messages_match_tritonclients():
    methods = list(OIP_METHODS)
    ours = json.loads(_python(DESCRIBE, "moe_runtime.api.inference.grpc_service_pb2", *methods))
    triton = json.loads(_python(DESCRIBE, "tritonclient.grpc.service_pb2", *methods))
    assert ours["methods"] == triton["methods"]
    for name, fields in ours["messages"].items():
        assert fields == triton["messages"][name], name


class _TinyOip(oip_grpc.GRPCInferenceServiceServicer):
    """ServerLive, and a ModelInfer that answers output_ids = input_ids + 1 and keeps the request."""

    def __init__(self):
        self.requests = []

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        self.requests.append(request)
        input_ids = np.frombuffer(request.raw_input_contents[0], dtype="<i8")
        response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="output_ids", datatype="INT64", shape=request.inputs[0].shape)
        response.raw_output_contents.append((input_ids + 1).astype("<i8").tobytes())
        return response


def test_tritonclient_talks_to_a_server_built_on_our_stubs():
    servicer = _TinyOip()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        answer = json.loads(_python(TRITON_CLIENT, f"127.0.0.1:{port}"))
    finally:
        server.stop(grace=None).wait(timeout=10)
    assert answer == {"live": True, "id": "r1", "output_ids": [[6, 7, 8]]}
    (request,) = servicer.requests
    assert (request.model_name, request.inputs[0].name, request.inputs[0].datatype) == (
        "tiny",
        "input_ids",
        "INT64",
    )
    assert list(request.inputs[0].shape) == [1, 3]
    params = request.parameters
    assert params["max_tokens"].WhichOneof("parameter_choice") == "int64_param"
    assert (params["max_tokens"].int64_param, params["stop"].string_param) == (4, "\n")
    assert params["ignore_eos"].bool_param is True
    assert params["priority"].uint64_param == 3  # Triton's field 5: kept, not dropped as unknown


def test_our_services_have_the_agreed_rpcs():
    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert generation.full_name == "moe_runtime.api.v1.Generation"
    shapes = {m.name: (m.output_type.name, m.server_streaming) for m in generation.methods}
    assert shapes == {
        "Generate": ("GenerateResponse", True),
        "GenerateUnary": ("GenerateUnaryResponse", False),
    }
    control = expert_control_pb2.DESCRIPTOR.services_by_name["ExpertControl"]
    assert [m.name for m in control.methods] == ["GetExpertLoad", "GetPlacement", "ApplyPlacement", "Drain"]
    assert not any(m.client_streaming or m.server_streaming for m in control.methods)
    request = generation_pb2.GenerateRequest(prompt_ids=generation_pb2.TokenIds(ids=[1, 2]))
    assert request.WhichOneof("prompt") == "prompt_ids"
    assert not request.HasField("max_tokens") and request.temperature == 0.0  # server default; greedy


def test_importing_the_stubs_does_not_import_torch():
    modules = [
        f"moe_runtime.api.{m}"
        for m in ("inference.grpc_service_pb2_grpc", "v1.generation_pb2_grpc", "v1.expert_control_pb2_grpc")
    ]
    imported = _python(f"import sys, {', '.join(modules)}; print('torch' in sys.modules)")
    assert imported.strip() == "False"
