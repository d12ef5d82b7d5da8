"""Test and benchmark helpers: tiny transformers MoE checkpoints (every supported family) built on the fly,
servers on loopback, and bf16 expert layers on CUDA for the GPU kernels' tests.

Imports transformers lazily; nothing in the serving path imports this module.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# A tiny config of each family: its transformers classes and the fields it names its own way. The
# Qwen configs' intermediate_size is their dense MLP's, unused while every layer is sparse.
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=256,
)
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=48, num_experts=4)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=96, num_experts=4, eos_token_id=2)),
}


def save_tiny_hf_model(path: str | Path, family: str = "mixtral", *, seed: int = 0, shard: bool = False,
                       **overrides: Any):
    """Build a random transformers model of `family` (a TINY_FAMILIES key, config.json's model_type),
    save it with save_pretrained; return the model (eval mode, eager experts)."""
    import torch
    import transformers

    config_class, model_class, fields = TINY_FAMILIES[family]
    config = _TINY_COMMON | fields | overrides
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    # The plain loop over experts: transformers' CPU grouped_mm needs 16-byte-aligned shapes.
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    return model


def save_tiny_hf_mixtral(path: str | Path, *, seed: int = 0, shard: bool = False, **overrides: Any):
    """Build a random transformers MixtralForCausalLM, save it with save_pretrained; return the model."""
    return save_tiny_hf_model(path, "mixtral", seed=seed, shard=shard, **overrides)


class ServerThread:
    """A RuntimeServer on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, config, model=None):
        import asyncio
        import threading

        from moe_runtime.server import RuntimeServer

        self.server = RuntimeServer(config, model)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="moe-test-server", daemon=True)

    def __enter__(self):
        import asyncio

        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=300)
        return self

    def call(self, coro, timeout: float = 60):
        """Run a coroutine (e.g. server.drain(...)) on the server's loop and wait for it."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.server.admin_port}"

    def __exit__(self, *exc):
        try:
            self.call(self.server.stop(grace=5.0), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


def loopback_config(**serving):
    """A RuntimeConfig for the tiny preset on 127.0.0.1 with OS-chosen ports."""
    from moe_runtime.config import RuntimeConfig, ServingConfig

    fields = dict(host="127.0.0.1", grpc_port=0, metrics_port=0, admin_port=0, admin_bind_address="127.0.0.1")
    fields.update(serving)
    return RuntimeConfig(model="tiny", serving=ServingConfig(**fields))


class SkewedLoad:
    """Client threads sending short requests over gRPC until stopped; counts what did not succeed."""

    def __init__(self, address: str, prompts: list[list[int]], clients: int = 3):
        import threading

        self.address, self.prompts = address, prompts
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        import grpc

        from moe_runtime.api.v1 import generation_pb2 as gen
        from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub, n = gen_grpc.GenerationStub(channel), i
            while not self._stop.is_set():
                prompt = self.prompts[n % len(self.prompts)]
                n += 1
                req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=prompt), max_tokens=1, ignore_eos=True)
                try:
                    stub.GenerateUnary(req, timeout=30)
                    self.ok += 1
                except grpc.RpcError as exc:
                    self.failed += 1
                    self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def heldout_prompts(checkpoint: str | Path, count: int = 24, length: int = 48) -> list[list[int]]:
    """Token-id prompts cut from a checkpoint's committed held-out text (real routing, real skew)."""
    from moe_runtime.tokenizer import load_tokenizer

    checkpoint = Path(checkpoint)
    tokenizer = load_tokenizer(checkpoint, 0)
    if tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer.json")
    ids = tokenizer.encode((checkpoint / "heldout.txt").read_text()[:200_000])
    step = max(length, len(ids) // count)
    return [ids[i:i + length] for i in range(0, step * count, step) if len(ids[i:i + length]) == length]


def transformers_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy `generate` for each prompt alone: the reference our generate() must match."""
    import torch

    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


# ---- expert layers on CUDA (the Triton kernels' GPU tests) ---------------------------------------------


@functools.cache
def cuda_bf16_experts(num_experts: int, hidden: int, ffn: int):
    """bf16 expert weights on the GPU, one set per shape (Mixtral's are 5.6 GB): w13 [E, 2F, H], w2 [E, H, F]."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(num_experts, 2 * ffn, hidden, device="cuda", generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, ffn, device="cuda", generator=gen) / ffn**0.5
    return w13.to(torch.bfloat16), w2.to(torch.bfloat16)


def cuda_bf16_case(num_tokens: int, top_k: int, layer: tuple[int, int, int] = (8, 256, 512), seed: int = 0):
    """x [T, H] in bf16 routed by random router logits over layer (E, H, F)'s experts:
    (x, w13, w2, topk_weights, topk_ids)."""
    import torch

    from moe_runtime.gating import route

    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_experts, hidden, _ = layer
    w13, w2 = cuda_bf16_experts(*layer)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    routing = route(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), top_k)
    return x, w13, w2, routing.topk_weights, routing.topk_ids


def float32_reference_error(out, x, w13, w2, topk_weights, topk_ids) -> float:
    """Relative error of the norm of `out` [T, H] against experts_reference in float32, over the chosen
    experts only (all of Mixtral's in float32 would take 11 GB); dropped slots (id E) stay dropped."""
    import torch

    from moe_runtime.experts import experts_reference

    used, ids = torch.unique(topk_ids, return_inverse=True)
    kept = used < w13.shape[0]  # a dropped slot's id E maps past the kept experts, as in the oracle
    want = experts_reference(x.float(), w13[used[kept]].float(), w2[used[kept]].float(), topk_weights, ids)
    if out.shape != want.shape:
        raise AssertionError(f"shape {tuple(out.shape)}, expected {tuple(want.shape)}")
    return ((out.float() - want).norm() / want.norm()).item()
