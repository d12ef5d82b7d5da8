"""`moe-client`: the command-line gRPC client of a moe-runtime server.

generate (streams tokens to the terminal), infer (OIP v2 ModelInfer), health, expert-load,
placement, apply-placement, drain. Talks gRPC only; no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime import oip
from moe_runtime.api.inference import grpc_service_pb2 as oip_pb
from moe_runtime.api.inference import grpc_service_pb2_grpc as oip_grpc
from moe_runtime.api.v1 import expert_control_pb2 as ec_pb
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.api.v1 import generation_pb2 as gen_pb
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.placement import Placement


def _generate(channel, args) -> int:
    req = gen_pb.GenerateRequest(model_name=args.model or "", temperature=args.temperature,
                                 max_tokens=args.max_tokens, stop=args.stop or [])
    if args.seed is not None:
        req.seed = args.seed
    if args.prompt_ids:
        req.prompt_ids.ids.extend(int(t) for t in args.prompt_ids.split(","))
    else:
        req.text = args.prompt
    last = None
    for msg in gen_grpc.GenerationStub(channel).Generate(req, timeout=args.timeout):
        sys.stdout.write(msg.text if msg.text or not msg.token_ids else " ".join(map(str, msg.token_ids)) + " ")
        sys.stdout.flush()
        last = msg
    if last is not None:
        reason = gen_pb.FinishReason.Name(last.finish_reason)
        print(f"\n[{reason}, {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} generated, "
              f"ttft {last.timing.time_to_first_token_seconds * 1000:.1f} ms]", file=sys.stderr)
    return 0


def _infer(channel, args) -> int:
    req = oip_pb.ModelInferRequest(model_name=args.model or "")
    if args.prompt_ids:
        ids = np.array([[int(t) for t in args.prompt_ids.split(",")]], dtype="<i8")
        req.inputs.add(name=oip.INPUT_IDS, datatype="INT64", shape=list(ids.shape))
        req.raw_input_contents.append(ids.tobytes())
    else:
        req.inputs.add(name=oip.TEXT_INPUT, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(oip.pack_bytes([args.prompt.encode()]))
    req.parameters["max_tokens"].int64_param = args.max_tokens
    req.parameters["temperature"].double_param = args.temperature
    resp = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=args.timeout)
    out = {}
    for tensor, raw in zip(resp.outputs, resp.raw_output_contents):
        if tensor.datatype == "BYTES":
            out[tensor.name] = [b.decode() for b in oip._unpack_bytes(raw)]
        else:
            out[tensor.name] = np.frombuffer(raw, dtype="<i8").reshape(list(tensor.shape)).tolist()
    print(json.dumps(out))
    return 0


def _health(channel, args) -> int:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                     timeout=args.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _expert_load(channel, args) -> int:
    msg = ec_grpc.ExpertControlStub(channel).GetExpertLoad(ec_pb.GetExpertLoadRequest(), timeout=args.timeout)
    ranks = {r.rank: np.array(r.slot_counts).reshape(msg.num_layers, msg.slots_per_rank).tolist()
             for r in msg.ranks}
    print(json.dumps({"placement_version": msg.placement_version, "num_layers": msg.num_layers,
                      "num_ranks": msg.num_ranks, "slots_per_rank": msg.slots_per_rank,
                      "timestamp": msg.timestamp.ToJsonString(), "ranks": ranks}))
    return 0


def _placement(channel, args) -> int:
    msg = ec_grpc.ExpertControlStub(channel).GetPlacement(ec_pb.GetPlacementRequest(), timeout=args.timeout)
    print(Placement.from_proto(msg).to_json(), end="")
    return 0


def _apply_placement(channel, args) -> int:
    p = Placement.from_json(Path(args.file).read_text())
    req = ec_pb.ApplyPlacementRequest(placement=p.to_proto())
    resp = ec_grpc.ExpertControlStub(channel).ApplyPlacement(req, timeout=args.timeout)
    print(json.dumps({"version": resp.version, "unchanged": resp.unchanged, "copied_bytes": resp.copied_bytes}))
    return 0


def _drain(channel, args) -> int:
    req = ec_pb.DrainRequest()
    req.timeout.FromSeconds(int(args.wait))
    resp = ec_grpc.ExpertControlStub(channel).Drain(req, timeout=args.wait + 5)
    print(json.dumps({"drained": resp.drained, "in_flight": resp.in_flight}))
    return 0 if resp.drained else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-client", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8001", help="host:port (admin commands: port 8003)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("generate", _generate), ("infer", _infer)):
        p = sub.add_parser(name, help=f"{name} from a prompt")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt")
        src.add_argument("--prompt-ids", help="comma-separated token ids")
        p.add_argument("--model", default=None, help="model name (default: the served model)")
        p.add_argument("--max-tokens", type=int, default=32)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.set_defaults(func=func)
    p = sub.add_parser("health", help="grpc.health.v1 Check (exit 0 when SERVING)")
    p.add_argument("--service", default="")
    p.set_defaults(func=_health)
    sub.add_parser("expert-load", help="ExpertControl.GetExpertLoad (admin port)").set_defaults(func=_expert_load)
    sub.add_parser("placement", help="ExpertControl.GetPlacement as JSON (admin port)").set_defaults(func=_placement)
    p = sub.add_parser("apply-placement", help="ExpertControl.ApplyPlacement from a JSON file (admin port)")
    p.add_argument("file")
    p.set_defaults(func=_apply_placement)
    p = sub.add_parser("drain", help="ExpertControl.Drain: stop admitting, wait for in-flight (admin port)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for in-flight requests")
    p.set_defaults(func=_drain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        try:
            return args.func(channel, args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
