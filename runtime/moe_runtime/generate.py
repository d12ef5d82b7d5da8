"""Generation: prefill + decode over the static KV cache, greedy and sampling, stop tokens.

Owns `SamplingParams`, request validation, `sample()` (on the device) and the step functions the
scheduler reuses (`prefill`, `decode`, `next_tokens`), with SCMoE contrast (contrast.py) per request.
Decode replays a CUDA graph where cuda_graphs.py has one, eager otherwise. No threads, no sockets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moe_runtime.contrast import contrast_logits, unsupported_reason, weak_model
from moe_runtime.cuda_graphs import decode_graphs
from moe_runtime.errors import InvalidRequest
from moe_runtime.model import Transformer

# B batch, V vocab


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: tokens to generate (>= 1). temperature: 0 = greedy (default). top_p: nucleus
    mass in (0, 1]. seed: per-request sampling seed (None: nondeterministic). stop_token_ids: ids that
    end the sequence (the model's eos is added unless ignore_eos). contrast_alpha: SCMoE self-contrast
    strength (>= 0; 0, the default, is off): each step's logits are contrasted with a weak routing's."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    contrast_alpha: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0):
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.contrast_alpha >= 0.0 and math.isfinite(self.contrast_alpha)):
            raise InvalidRequest(f"contrast_alpha must be a finite number >= 0, got {self.contrast_alpha}")


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop"


def validate_prompt(prompt_ids: list[int], params: SamplingParams, model: Transformer) -> None:
    """Raise InvalidRequest for an empty, out-of-vocabulary or over-long prompt."""
    if not prompt_ids:
        raise InvalidRequest("prompt is empty")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    limit = model.args.max_seq_len
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) "
                             f"exceeds the model's context of {limit} tokens")
    if params.contrast_alpha > 0 and unsupported_reason(model) is not None:
        raise InvalidRequest(unsupported_reason(model))


def to_device(values: list[int] | list[float], device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the work queued on the device (a pinned,
    non-blocking copy on CUDA; a plain copy waits for the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next ids [B] from logits [B, V]; per-row temperature [B] (0 = greedy) and top_p [B].

    Sampling is an exponential race (argmax of p / Exp(1)), which equals multinomial sampling and lets
    each row draw its noise from its own generator; everything stays on the device.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]  # always keeps the top token
    sorted_p = sorted_p * keep
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    noise = torch.stack([
        torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g) for g in generators
    ])
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


@torch.inference_mode()
def prefill(model: Transformer, prompt_ids: list[int], slot: int, *, contrast_alpha: float = 0.0) -> torch.Tensor:
    """Run one prompt through the model into cache row `slot`; logits [V] of its last position.

    contrast_alpha > 0: the weak model (contrast.py) prefills its own cache row too, and the logits are
    SCMoE's contrasted scores."""
    device = model.output.weight.device
    n = len(prompt_ids)
    tokens = to_device(prompt_ids, device)[None]
    pos = torch.arange(n, device=device)[None]
    slots = None if slot == 0 else to_device([slot], device)
    logits = model(tokens, pos, slots, kv_len=n, last_only=True)[0, -1]
    if contrast_alpha > 0:
        weak = weak_model(model).forward(model, tokens, pos, slots, kv_len=n, last_only=True)[0, -1]
        logits = contrast_logits(logits[None], weak[None], contrast_alpha)[0]
    return logits


@torch.inference_mode()
def prefill_batch(model: Transformer, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
    """Several prompts in one forward, right-padded to the longest, each into its cache row `slots[i]`;
    logits [A, V] of each prompt's last token.

    The padding never reaches the experts (token_index: it is neither computed nor counted as load) and
    writes only cache positions after its row's prompt, which decode overwrites before it attends them.
    Not for expert-parallel leaders (followers replay plain forwards) or SCMoE rows: prefill() those."""
    device = model.output.weight.device
    a, s = len(prompts), max(len(p) for p in prompts)
    tokens = to_device([t for p in prompts for t in p + [0] * (s - len(p))], device).view(a, s)
    pos = torch.arange(s, device=device).expand(a, s)
    slot_t = None if slots == list(range(a)) else to_device(slots, device)
    real = None
    if any(len(p) < s for p in prompts):
        real = to_device([i * s + j for i, p in enumerate(prompts) for j in range(len(p))], device)
    last = to_device([i * s + len(p) - 1 for i, p in enumerate(prompts)], device)
    return model(tokens, pos, slot_t, kv_len=s, token_index=real, output_index=last)


@dataclass
class DecodeOutput:
    """One decode step's logits [B, V] and, from a graph, their greedy argmax [B] made on the device.

    static: the tensors are views of a CUDA graph's outputs, overwritten by its next replay.
    """

    logits: torch.Tensor
    greedy_ids: torch.Tensor | None = None
    static: bool = False


@torch.inference_mode()
def decode(
    model: Transformer, tokens: torch.Tensor | list[int], positions: list[int], slots: list[int],
    *, cuda_graphs: bool = True, contrast_alphas: list[float] | None = None,
) -> DecodeOutput:
    """One token per sequence: tokens [B] at `positions` in cache rows `slots`.

    cuda_graphs: replay a captured step where cuda_graphs.py has one (CUDA, no expert parallelism,
    dynamic gating); eager otherwise, and always with False. contrast_alphas [B]: SCMoE strength per
    row; rows above 0 get contrasted logits (the weak model decodes them eager, in its own cache rows).
    """
    graphs = decode_graphs(model) if cuda_graphs else None
    replayed = graphs.run(model, tokens, positions, slots) if graphs is not None else None
    device = model.output.weight.device
    if not isinstance(tokens, torch.Tensor):
        tokens = to_device(tokens, device)
    if replayed is not None:
        out = DecodeOutput(*replayed, static=True)
    else:
        pos = to_device(positions, device)[:, None]
        slot_t = None if slots == list(range(len(slots))) else to_device(slots, device)
        out = DecodeOutput(model(tokens[:, None], pos, slot_t, kv_len=max(positions) + 1)[:, -1])
    if contrast_alphas is not None and any(a > 0 for a in contrast_alphas):
        out = _contrasted(model, out, tokens, positions, slots, contrast_alphas)
    return out


def _contrasted(model, out: DecodeOutput, tokens: torch.Tensor, positions, slots, alphas) -> DecodeOutput:
    """SCMoE on the rows whose alpha is above 0: their weak logits, then contrast_logits (a fresh
    float32 copy, so a graph's static output is never written)."""
    rows = [i for i, a in enumerate(alphas) if a > 0]
    device = out.logits.device
    index = torch.tensor(rows, device=device)
    pos = torch.tensor([positions[i] for i in rows], device=device)[:, None]  # [R, 1]
    slot_t = torch.tensor([slots[i] for i in rows], device=device)  # [R]
    kv_len = max(positions[i] for i in rows) + 1
    weak = weak_model(model).forward(model, tokens[index][:, None], pos, slot_t, kv_len=kv_len)[:, -1]  # [R, V]
    logits = out.logits.to(torch.float32, copy=True)  # [B, V]
    alpha = torch.tensor([alphas[i] for i in rows], device=device)
    logits[index] = contrast_logits(logits[index], weak, alpha)
    return DecodeOutput(logits)


def decode_step(model: Transformer, tokens: torch.Tensor | list[int], positions: list[int], slots: list[int],
                *, cuda_graphs: bool = True) -> torch.Tensor:
    """decode() for callers that keep the logits [B, V]: a copy when they came from a graph."""
    out = decode(model, tokens, positions, slots, cuda_graphs=cuda_graphs)
    return out.logits.clone() if out.static else out.logits


def next_tokens(
    out: DecodeOutput, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next ids [B] on the device. A batch that is all greedy (known on the host) takes the argmax the
    graph made, or makes it, with no host read; otherwise sample() over the logits."""
    if not any(t > 0 for t in temperatures):
        return out.greedy_ids if out.greedy_ids is not None else out.logits.float().argmax(dim=-1)
    device = out.logits.device
    return sample(out.logits, to_device(temperatures, device), to_device(top_ps, device), generators)


def generate(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, *, cuda_graphs: bool = True
) -> list[Completion]:
    """Generate for a batch of prompts of different lengths; returns generated ids only.

    cuda_graphs: decode through captured CUDA graphs where they apply (see decode()).
    """
    params.validate()
    if not prompts:
        raise InvalidRequest("no prompts given")
    for p in prompts:
        validate_prompt(p, params, model)
    device = model.output.weight.device
    need = max(len(p) for p in prompts) + params.max_new_tokens
    if model.max_batch < len(prompts) or model.max_cache_len < need:
        model.setup_cache(max(len(prompts), model.max_batch), max(need, model.max_cache_len))
    stop = set(params.stop_token_ids)
    if not params.ignore_eos and model.args.eos_token_id is not None:
        stop.add(model.args.eos_token_id)
    done = [Completion(list(p)) for p in prompts]
    gens = [make_generator(None if params.seed is None else params.seed + i, device) if params.temperature > 0
            else None for i in range(len(prompts))]
    alpha = params.contrast_alpha
    out = DecodeOutput(torch.stack([prefill(model, p, i, contrast_alpha=alpha) for i, p in enumerate(prompts)]))
    active = list(range(len(prompts)))
    while active:
        n = len(active)
        next_ids = next_tokens(out, [params.temperature] * n, [params.top_p] * n, [gens[i] for i in active])
        still = []
        for row, tok in zip(active, next_ids.tolist()):
            c = done[row]
            c.output_ids.append(tok)
            if tok in stop:
                c.finish_reason = "stop"
            elif len(c.output_ids) >= params.max_new_tokens:
                c.finish_reason = "length"
            else:
                still.append(row)
        if not still:
            break
        keep = [active.index(r) for r in still]
        positions = [len(done[r].prompt_ids) + len(done[r].output_ids) - 1 for r in still]
        tokens = next_ids if len(keep) == n else next_ids[torch.tensor(keep, device=device)]
        out = decode(model, tokens, positions, still, cuda_graphs=cuda_graphs, contrast_alphas=[alpha] * len(still))
        active = still
    return done
