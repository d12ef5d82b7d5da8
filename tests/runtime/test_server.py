"""The gRPC server on loopback with the tiny preset: OIP v2, Generation, health, reflection, metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_runtime.api.inference import grpc_service_pb2 as pb
from moe_runtime.api.inference import grpc_service_pb2_grpc as pb_grpc
from moe_runtime.api.v1 import generation_pb2 as gen
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.testing import ServerThread, loopback_config
from moe_runtime.weights import load_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with ServerThread(loopback_config(max_tokens_limit=256)) as st:
        yield st


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _ids_request(ids: np.ndarray, raw: bool = True, dtype: str = "INT64", **params) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    tensor = req.inputs.add(name="input_ids", datatype=dtype, shape=list(ids.shape))
    np_dtype = "<i8" if dtype == "INT64" else "<i4"
    if raw:
        req.raw_input_contents.append(ids.astype(np_dtype).tobytes())
    elif dtype == "INT64":
        tensor.contents.int64_contents.extend(ids.reshape(-1).tolist())
    else:
        tensor.contents.int_contents.extend(ids.reshape(-1).tolist())
    for name, value in params.items():
        if isinstance(value, bool):
            req.parameters[name].bool_param = value
        elif isinstance(value, int):
            req.parameters[name].int64_param = value
        elif isinstance(value, float):
            req.parameters[name].double_param = value
        else:
            req.parameters[name].string_param = value
    return req


def _output_ids(resp) -> np.ndarray:
    tensor = next(t for t in resp.outputs if t.name == "output_ids")
    index = list(resp.outputs).index(tensor)
    return np.frombuffer(resp.raw_output_contents[index], dtype="<i8").reshape(list(tensor.shape))


def _reference(prompt: list[int], n: int) -> list[int]:
    model = load_model("tiny")
    return generate(model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].output_ids


def test_health_is_serving_and_reflection_lists_the_services(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "moe_runtime.api.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert {"inference.GRPCInferenceService", "moe_runtime.api.v1.Generation", "grpc.health.v1.Health"} <= names
    assert "moe_runtime.api.v1.ExpertControl" not in names  # admin lives on its own port


def test_oip_metadata_and_readiness(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert meta.name == "tiny" and {t.name for t in meta.inputs} == {"input_ids", "text_input"}


@pytest.mark.parametrize(("raw", "dtype"), [(True, "INT64"), (False, "INT64"), (True, "INT32"), (False, "INT32")])
def test_model_infer_returns_the_greedy_tokens(channel, raw, dtype):
    prompts = np.array([[5, 6, 7, 8], [40, 41, 42, 43]])
    req = _ids_request(prompts, raw=raw, dtype=dtype, max_tokens=6, ignore_eos=True)
    resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req)
    got = _output_ids(resp)
    assert got.shape == (2, 6)
    for row, prompt in zip(got, prompts.tolist()):
        assert row.tolist() == _reference(prompt, 6)


def test_model_infer_with_text_input_returns_text(channel):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"import os")
    req.parameters["max_tokens"].int64_param = 4
    resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req)
    assert {t.name for t in resp.outputs} == {"output_ids", "text_output"}


BAD_INFER = [
    (dict(dtype="FP32"), "datatype"),
    (dict(shape=[4]), "shape"),
    (dict(shape=[1, 0]), "shape"),
    (dict(name="tokens"), "unknown input 'tokens'"),
    (dict(model="other"), "unknown model 'other'"),
    (dict(version="7"), "model_version"),
    (dict(params={"max_tokens": 0}), "max_tokens must be a positive integer"),
    (dict(params={"max_tokens": 100000}), "exceeds the server limit"),
    (dict(params={"temperature": "hot"}), r"parameters\[temperature\]"),
    (dict(params={"beam_width": 4}), r"parameters\[beam_width\]: unknown parameter"),
    (dict(ids=[[1, 999999]]), "outside the vocabulary"),
    (dict(raw_bytes=b"\x01\x02\x03"), "raw_input_contents"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_INFER)
def test_bad_infer_requests_are_invalid_argument_naming_the_field(channel, bad, message):
    ids = np.array(bad.get("ids", [[1, 2, 3]]))
    req = _ids_request(ids, **bad.get("params", {}))
    tensor = req.inputs[0]
    tensor.datatype = bad.get("dtype", tensor.datatype)
    tensor.name = bad.get("name", tensor.name)
    if "shape" in bad:
        del tensor.shape[:]
        tensor.shape.extend(bad["shape"])
    if "raw_bytes" in bad:
        req.raw_input_contents[0] = bad["raw_bytes"]
    req.model_name = bad.get("model", "tiny")
    req.model_version = bad.get("version", "")
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, err.value.details()), err.value.details()


def test_generate_streams_tokens_then_finish_with_usage(channel):
    stub = gen_grpc.GenerationStub(channel)
    req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[3, 4, 5]), max_tokens=7, ignore_eos=True)
    msgs = list(stub.Generate(req))
    tokens = [t for m in msgs for t in m.token_ids]
    assert tokens == _reference([3, 4, 5], 7)
    assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert msgs[-1].usage.prompt_tokens == 3 and msgs[-1].usage.completion_tokens == 7


def test_generate_with_contrast_alpha_returns_the_self_contrasted_tokens(channel):
    req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[3, 4, 5]), max_tokens=7, ignore_eos=True,
                              contrast_alpha=1.5)
    tokens = list(gen_grpc.GenerationStub(channel).GenerateUnary(req).token_ids)
    params = SamplingParams(max_new_tokens=7, ignore_eos=True, contrast_alpha=1.5)
    assert tokens == generate(load_model("tiny"), [[3, 4, 5]], params)[0].output_ids != _reference([3, 4, 5], 7)


def test_generate_rejects_an_empty_prompt(channel):
    with pytest.raises(grpc.RpcError) as err:
        list(gen_grpc.GenerationStub(channel).Generate(gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[]))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in err.value.details()


def _margins(prompt: list[int], tokens: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at each generated position (teacher-forced, one sequence alone)."""
    model = load_model("tiny")
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(seq, torch.arange(seq.shape[1])[None], kv_len=seq.shape[1])[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def test_concurrent_streams_get_the_tokens_each_would_get_alone(server):
    """16 clients at once: continuous batching must not change greedy results (fp32). A position whose
    top-2 logit margin is under the tolerance may legitimately flip, so comparison stops there."""
    prompts = [[(7 * i + j) % 300 + 1 for j in range(3 + i % 5)] for i in range(16)]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        with grpc.insecure_channel(server.address) as ch:
            req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=prompts[i]), max_tokens=12, ignore_eos=True)
            results[i] = [t for m in gen_grpc.GenerationStub(ch).Generate(req) for t in m.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, prompt in enumerate(prompts):
        alone = _reference(prompt, 12)
        for pos, (a, b) in enumerate(zip(results[i], alone)):
            if a != b:
                assert _margins(prompt, alone)[pos] < 1e-4, (i, pos)
                break


def test_prometheus_metrics_include_per_expert_load(server, channel):
    list(gen_grpc.GenerationStub(channel).Generate(gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[1, 2]),
                                                                        max_tokens=2)))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read()
    text = body.decode()
    assert 'moe_runtime_expert_tokens_total{expert="0",layer="0"}' in text
    for name in ("moe_runtime_requests_total", "moe_runtime_time_to_first_token_seconds_bucket",
                 "moe_runtime_queue_depth", "moe_runtime_placement_version"):
        assert name in text


def test_a_failed_request_does_not_disturb_the_batch(server):
    prompt = [9, 8, 7]
    with grpc.insecure_channel(server.address) as ch:
        stub = gen_grpc.GenerationStub(ch)
        stream = stub.Generate(gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=prompt), max_tokens=40,
                                                   ignore_eos=True))
        first = next(stream)
        with pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_ids_request(np.array([[1, 10**6]])))
        rest = [t for m in stream for t in m.token_ids]
    assert list(first.token_ids) + rest == _reference(prompt, 40)


def _wait_idle(server, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while server.server.serving.engine.in_flight() and time.monotonic() < end:
        time.sleep(0.01)
    assert server.server.serving.engine.in_flight() == 0


def test_client_cancellation_frees_the_slot(server):
    with grpc.insecure_channel(server.address) as ch:
        call = gen_grpc.GenerationStub(ch).Generate(
            gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[1, 2]), max_tokens=250, ignore_eos=True))
        next(call)
        call.cancel()
    _wait_idle(server)


def test_deadline_exceeded_frees_the_slot(server):
    with grpc.insecure_channel(server.address) as ch:
        req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[1, 2]), max_tokens=250, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as err:
            for _ in gen_grpc.GenerationStub(ch).Generate(req, timeout=0.05):
                time.sleep(0.01)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(server)
