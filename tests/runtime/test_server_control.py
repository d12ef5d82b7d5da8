"""Server control paths: overload, drain, SIGTERM, ExpertControl, tritonclient, moe-client, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_runtime import oip
from moe_runtime.__main__ import build_parser, runtime_config
from moe_runtime.api.inference import grpc_service_pb2 as pb
from moe_runtime.api.v1 import expert_control_pb2 as ec
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.api.v1 import generation_pb2 as gen
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.errors import ConfigError, InvalidRequest
from moe_runtime.placement import Placement, round_robin
from moe_runtime.testing import ServerThread, loopback_config

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def _stream(address: str, max_tokens: int, prompt=(1, 2, 3)):
    ch = grpc.insecure_channel(address)
    req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=list(prompt)), max_tokens=max_tokens, ignore_eos=True)
    return ch, gen_grpc.GenerationStub(ch).Generate(req)


def test_full_queue_answers_resource_exhausted():
    with ServerThread(loopback_config(max_running_sequences=1, max_queue=1, max_tokens_limit=400)) as st:
        ch1, running = _stream(st.address, 400)
        next(running)  # admitted: holds the only batch slot
        ch2, queued = _stream(st.address, 4)
        engine = st.server.serving.engine
        while engine.queue_depth() < 1:
            threading.Event().wait(0.005)
        ch3, rejected = _stream(st.address, 4)
        with pytest.raises(grpc.RpcError) as err:
            next(rejected)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
        running.cancel()
        assert len([t for m in queued for t in m.token_ids]) == 4  # the queued one still completes
        for ch in (ch1, ch2, ch3):
            ch.close()


def test_drain_finishes_in_flight_and_refuses_new_requests():
    with ServerThread(loopback_config(max_tokens_limit=300)) as st:
        ch, stream = _stream(st.address, 120)
        first = next(stream)
        with grpc.insecure_channel(st.admin_address) as admin:
            drained = {}
            t = threading.Thread(target=lambda: drained.update(resp=ec_grpc.ExpertControlStub(admin).Drain(
                ec.DrainRequest(timeout={"seconds": 30}))))
            t.start()
            rest = [tok for m in stream for tok in m.token_ids]
            t.join(timeout=60)
        assert len(first.token_ids) + len(rest) == 120
        assert drained["resp"].drained and drained["resp"].in_flight == 0
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            next(_stream(st.address, 2)[1])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ch.close()


def test_expert_load_is_cumulative_and_counts_every_token_slot():
    with ServerThread(loopback_config()) as st, grpc.insecure_channel(st.admin_address) as admin:
        stub = ec_grpc.ExpertControlStub(admin)
        before = stub.GetExpertLoad(ec.GetExpertLoadRequest())
        ch, stream = _stream(st.address, 5, prompt=(4, 5, 6, 7))
        list(stream)
        ch.close()
        after = stub.GetExpertLoad(ec.GetExpertLoadRequest())
        args = st.server.serving.engine.model.args
        b = np.array(before.ranks[0].slot_counts).reshape(args.num_layers, -1)
        a = np.array(after.ranks[0].slot_counts).reshape(args.num_layers, -1)
        assert (a >= b).all()
        # 4 prompt tokens + 4 decoded inputs (the 5th token is sampled, never fed back) = 8 tokens x top_k
        assert ((a - b).sum(axis=1) == 8 * args.top_k).all()
        assert after.placement_version == 0 and after.num_ranks == 1


def test_a_placement_with_shares_applies_and_the_slot_counters_split_by_them():
    with ServerThread(loopback_config()) as st, grpc.insecure_channel(st.admin_address) as admin:
        stub = ec_grpc.ExpertControlStub(admin)
        args = st.server.serving.engine.model.args
        experts = args.num_experts
        held = (*range(experts), 0)  # expert 0 twice: its first slot takes 1/4, its last 3/4
        shares = (0.25, *[1.0] * (experts - 1), 0.75)
        placement = Placement(1, 1, experts + 1, (held,) * args.num_layers, (shares,) * args.num_layers)
        assert not stub.ApplyPlacement(ec.ApplyPlacementRequest(placement=placement.to_proto())).unchanged
        assert Placement.from_proto(stub.GetPlacement(ec.GetPlacementRequest())) == placement
        before = stub.GetExpertLoad(ec.GetExpertLoadRequest())
        ch, stream = _stream(st.address, 24, prompt=tuple(range(1, 40)))
        list(stream)
        ch.close()
        after = stub.GetExpertLoad(ec.GetExpertLoadRequest())
        load = np.array(after.ranks[0].slot_counts) - np.array(before.ranks[0].slot_counts)
        load = load.reshape(args.num_layers, -1)  # [L, P]
        expert0 = load[:, 0] + load[:, -1]
        assert (expert0 > 0).all() and (load[:, 0] == np.ceil(expert0 / 4)).all()


def test_apply_placement_versions_and_validation():
    with ServerThread(loopback_config()) as st, grpc.insecure_channel(st.admin_address) as admin:
        stub = ec_grpc.ExpertControlStub(admin)
        args = st.server.serving.engine.model.args
        current = round_robin(args.num_layers, args.num_experts, 1)
        same = stub.ApplyPlacement(ec.ApplyPlacementRequest(placement=current.to_proto()))
        assert same.unchanged
        reversed_ = type(current)(0, 1, args.num_experts, tuple(tuple(reversed(r)) for r in current.slots))
        cases = [
            (reversed_, grpc.StatusCode.INVALID_ARGUMENT),  # same version, another body
            (reversed_.with_version(1), None),  # newer: accepted
            (current.with_version(0), grpc.StatusCode.FAILED_PRECONDITION),  # older
            (type(current)(2, 1, args.num_experts, ((0,) * args.num_experts,) * args.num_layers),
             grpc.StatusCode.INVALID_ARGUMENT),  # experts 1.. not placed
        ]
        for placement, code in cases:
            if code is None:
                assert not stub.ApplyPlacement(ec.ApplyPlacementRequest(placement=placement.to_proto())).unchanged
                continue
            with pytest.raises(grpc.RpcError) as err:
                stub.ApplyPlacement(ec.ApplyPlacementRequest(placement=placement.to_proto()))
            assert err.value.code() == code, err.value.details()
        assert stub.GetPlacement(ec.GetPlacementRequest()).version == 1


def _serve_subprocess(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    cfg = tmp_path / "runtime.yaml"
    cfg.write_text(textwrap.dedent("""\
        model: tiny
        serving:
          host: 127.0.0.1
          grpc_port: 0
          metrics_port: 0
          admin_port: 0
          max_tokens_limit: 500
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime")}
    proc = subprocess.Popen([sys.executable, "-m", "moe_runtime", "serve", "--config", str(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, json.loads(line)


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    proc, ready = _serve_subprocess(tmp_path, "--drain-grace-seconds", "30")
    try:
        ch, stream = _stream(f"127.0.0.1:{ready['grpc_port']}", 200)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = [t for m in stream for t in m.token_ids]
        assert len(first.token_ids) + len(rest) == 200
        assert proc.wait(timeout=60) == 0
        ch.close()
    finally:
        proc.kill()


def test_tritonclient_and_moe_client_talk_to_the_server(tmp_path):
    proc, ready = _serve_subprocess(tmp_path)
    try:
        addr = f"127.0.0.1:{ready['grpc_port']}"
        script = textwrap.dedent(f"""
            import numpy as np, tritonclient.grpc as tc
            c = tc.InferenceServerClient("{addr}")
            assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
            assert c.get_model_metadata("tiny").name == "tiny"
            inp = tc.InferInput("input_ids", [1, 3], "INT64")
            inp.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int64))
            r = c.infer("tiny", [inp], parameters={{"max_tokens": 4, "ignore_eos": True}})
            print(r.as_numpy("output_ids").tolist())
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)[0]) == 4
        env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime")}
        cli = [sys.executable, "-m", "moe_runtime.client"]
        health = subprocess.run([*cli, "--address", addr, "health"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
        gen_out = subprocess.run([*cli, "--address", addr, "generate", "--prompt-ids", "1,2", "--max-tokens", "3"],
                                 capture_output=True, text=True, env=env, timeout=60)
        assert gen_out.returncode == 0 and "prompt + 3 generated" in gen_out.stderr
        load = subprocess.run([*cli, "--address", f"127.0.0.1:{ready['admin_port']}", "expert-load"],
                              capture_output=True, text=True, env=env, timeout=60)
        assert load.returncode == 0 and json.loads(load.stdout)["num_layers"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\ngating: {mode: static, capacity_fraction: 0.5}\nserving: {grpc_port: 9000}\n")
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--grpc-port", "9100",
                                      "--capacity-fraction", "2"])
    config = runtime_config(args)
    assert config.serving.grpc_port == 9100 and config.gating.mode == "static"
    assert config.gating.capacity_fraction == 2.0 and config.serving.admin_bind_address == "127.0.0.1"


def test_unknown_config_field_is_rejected_with_its_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serving: {grpc_prot: 1}\n")
    with pytest.raises(ConfigError, match=r"serving\.grpc_prot"):
        runtime_config(build_parser().parse_args(["serve", "--config", str(cfg)]))


_param_values = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=5), st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["input_ids", "text_input", "x"]),
    datatype=st.sampled_from(["INT32", "INT64", "BYTES", "FP32", ""]),
    shape=st.lists(st.integers(-2, 5), max_size=3),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
    params=st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "seed", "stop", "bogus"]),
                           _param_values, max_size=3),
)
def test_fuzzed_infer_requests_parse_or_fail_with_invalid_request(name, datatype, shape, raw, params):
    req = pb.ModelInferRequest()
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        req.raw_input_contents.append(raw)
    for key, value in params.items():
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    try:
        call = oip.parse_infer_request(req, 16)
        call.params.validate()
    except InvalidRequest:
        return
    assert call.prompts and all(p is not None for p in call.prompts)
