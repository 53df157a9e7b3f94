"""Our Wanda and SparseGPT against a PyTorch re-statement of the reference loops, on one layer and a whole model.

The peer is written here from the published algorithms (the Wanda repository's `prune_wanda` and
SparseGPT's `SparseGPT.fasterprune`): forward hooks on every `nn.Linear` of a decoder layer
accumulate the inputs' statistics, each linear is pruned in place, and the layer is run again so
the next layer sees the pruned layer's outputs. Both sides prune the language tower of the same
HF LLaVA checkpoint (random weights, `--config` a `benchmarks/llava.py` preset or JSON) on the same
calibration token ids and images; ours is `load_hf_model` + `sparsevlm.pruning.pruner` (calibration
mode `sequential`). The one-layer case prunes one `--layer-size` kernel from `--layer-tokens`
inputs; each side builds its own statistics inside the timed call.

DSnoT (from Wanda's mask) and ECoFLaP (Wanda under its layer-wise allocation; its zeroth- or
first-order importance pass is timed as the `importance` phase) have no peer here: their whole-model
rows time ours alone and give the error each leaves.

After one warm-up call of each, `--repeats` rounds of one ours call and one peer call are timed
(alternating, so the host's load hits both alike); `x peer` = ours' median / the peer's. The same
run checks that the two agree: the fraction of equal mask entries, the relative difference of the
pruned weights, and the error each leaves (the layer's ‖XW − XŴ‖/‖XW‖; for the whole model the
relative change of the language model's last hidden state, both run through the PyTorch model);
on one layer also each side's agreement with the peer run in float64, the float32 noise floor.
Prints a table, writes JSON.

    python benchmarks/peer_prune.py [--config small|quick|1b|FILE.json] [--dir DIR] [--json results/peer_prune.json]
    python benchmarks/peer_prune.py --quick      # `quick` model, layer 512, 256 tokens, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
import torch
from prune import CompileMeter, layer_inputs, layer_stats, parse_layer_size, time_calls

from sparsevlm.config import Pattern, SparsitySpec
from sparsevlm.hf.load import Naming, conversion_rules, load_hf_model
from sparsevlm.masks import flat_masks, prunable_paths
from sparsevlm.pruning import prune, prune_layer
from sparsevlm.pruning.importance import ECOFLAP_ORDERS, allocation_ratios, importance_scores
from sparsevlm.tree import flatten

from common import calibration_inputs, positive_int, write_results
from llava import build_checkpoint
from llava import sizes as llava_sizes

SPARSITY = 0.5
PEERED = ("wanda", "sparsegpt")  # the methods with a PyTorch peer here
# Ours alone, on the same model and data: DSnoT (from Wanda's mask) and Wanda under ECoFLaP's layer-wise
# allocation, whose importance pass (zeroth- or first-order) is timed apart as well.
OURS_ONLY = ("dsnot", "ecoflap-first", "ecoflap-zeroth")
METHODS = PEERED + OURS_ONLY
PATTERNS = ("unstructured", "2:4")
SCOPES = ("layer", "model")
# The reference's (prune_n, prune_m): prune_n weights *pruned* in every group of prune_m inputs; 0 = unstructured.
PEER_NM = {"unstructured": (0, 0), "2:4": (2, 4)}
# Our pattern doing what the reference does. Wanda ranks each output row; SparseGPT's fasterprune ranks
# each 128-column block over all rows together, which is our `unstructured-layer` (our `unstructured`
# would balance every row, a different selection).
OURS_PATTERN = {("wanda", "unstructured"): "unstructured", ("sparsegpt", "unstructured"): "unstructured-layer",
                ("wanda", "2:4"): "2:4", ("sparsegpt", "2:4"): "2:4",
                ("dsnot", "unstructured"): "unstructured", ("dsnot", "2:4"): "2:4",
                # A global allocation needs an unstructured pattern: no ECoFLaP row under 2:4.
                ("ecoflap-first", "unstructured"): "unstructured", ("ecoflap-zeroth", "unstructured"): "unstructured"}
FULL = {"config": "small", "layer_size": "4096", "layer_tokens": 2048, "calib_samples": 32, "text_tokens": 47,
        "batch_size": 16, "repeats": 3}
QUICK = {"config": "quick", "layer_size": "512", "layer_tokens": 256, "calib_samples": 4, "text_tokens": 15,
         "batch_size": 2, "repeats": 1}
BOS_ID = 2  # benchmarks/llava.py's tokenizer: pad 0, unk 1, bos 2, eos 3, image 4
FIRST_TEXT_ID = 5


# --- the peer: PyTorch re-statement of the reference loops --------------------------------------------------------

class WandaInputs:
    """Wanda's `scaler_row`: the running mean over samples of ‖x_j‖² per input feature j."""

    def __init__(self, columns: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.scaler_row = torch.zeros(columns, device=device, dtype=dtype)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Fold in one forward call's inputs `[batch, tokens, in]`."""
        inp = inp.unsqueeze(0) if inp.dim() == 2 else inp
        count = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().to(self.scaler_row.dtype)
        self.scaler_row *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class HessianInputs:
    """SparseGPT's `H = 2/n · Σ XᵀX` over the n samples seen."""

    def __init__(self, columns: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Fold in one forward call's inputs `[batch, tokens, in]`."""
        inp = inp.unsqueeze(0) if inp.dim() == 2 else inp
        count = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        inp = math.sqrt(2 / self.nsamples) * inp.to(self.H.dtype)
        self.H += inp.matmul(inp.t())


def peer_wanda(weight: torch.Tensor, stats: WandaInputs, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
    """Wanda on a `[out, in]` weight, in place: zero the lowest |W|·sqrt(scaler_row) per row (or per N:M group).

    Returns the keep-mask.
    """
    metric = torch.abs(weight) * torch.sqrt(stats.scaler_row.reshape(1, -1))
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n != 0:
        for column in range(0, metric.shape[1], prune_m):
            group = metric[:, column : column + prune_m].float()
            pruned.scatter_(1, column + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    weight[pruned] = 0
    return ~pruned


def peer_sparsegpt(weight: torch.Tensor, stats: HessianInputs, sparsity: float, prune_n: int, prune_m: int,
                   blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's `fasterprune` on a `[out, in]` weight, in place: blocked OBS with lazy updates.

    Returns the keep-mask. One change from the reference: it prunes the scores `<=` the sorted
    block's element at index k = int(numel · sparsity), which is k + 1 weights per block; this
    takes the element at k − 1, so both sides prune exactly k.
    """
    W = weight.data.clone().to(stats.H.dtype)  # float32, unless the statistics are kept in float64
    rows, columns = W.shape
    H = stats.H
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape(1, -1)) ** 2
            k = int(tmp.numel() * sparsity)
            mask1 = tmp <= torch.sort(tmp.flatten())[0][k - 1] if k else torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : i + prune_m] ** 2 / (torch.diag(Hinv1)[i : i + prune_m].reshape(1, -1)) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    weight.copy_(W)
    return ~pruned


PEER = {"wanda": (WandaInputs, peer_wanda), "sparsegpt": (HessianInputs, peer_sparsegpt)}


class _Caught(Exception):
    """Raised by the hook on the first decoder layer once it has its inputs (the reference's `Catcher`)."""


def capture_first_layer_inputs(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """`[(hidden states, layer kwargs)]` per batch: what the first decoder layer receives, image features spliced in."""
    captured = []

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Caught

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for input_ids, pixel_values in batches:
            try:
                model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return captured


def decoder_layers(model: Any) -> Any:
    """The Llama decoder layers of a transformers-v5 `LlavaForConditionalGeneration`."""
    return model.model.language_model.layers


def _hidden(output: Any) -> torch.Tensor:
    # Decoder layers return a tensor in transformers v5, a tuple before.
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def peer_prune_model(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], method: str,
                     pattern: str, sparsity: float) -> dict[tuple[int, str], torch.Tensor]:
    """Prune every linear of every decoder layer in place, layer by layer; `{(layer, module name): keep-mask}`."""
    stats_class, prune_fn = PEER[method]
    prune_n, prune_m = PEER_NM[pattern]
    inputs = capture_first_layer_inputs(model, batches)
    keeps = {}
    for index, layer in enumerate(decoder_layers(model)):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        stats = {name: stats_class(m.in_features, m.weight.device) for name, m in linears.items()}
        handles = [m.register_forward_hook(lambda module, args, output, s=stats[name]: s.add_batch(args[0].data))
                   for name, m in linears.items()]
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
        for handle in handles:
            handle.remove()
        for name, m in linears.items():
            keeps[index, name] = prune_fn(m.weight.data, stats[name], sparsity, prune_n, prune_m)
        inputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    return keeps


# --- timing ------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timed peer call has finished when the clock stops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], reset: Callable[[], None] | None, meter: CompileMeter) -> tuple[float, float, Any]:
    """Wall time of one call of `fn` (which must block on its result), JAX compile time inside it, its result."""
    if reset is not None:
        reset()
    compile_before = meter.seconds
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, meter.seconds - compile_before, result


def time_pair(ours: Callable[[], Any], peer: Callable[[], Any], repeats: int, meter: CompileMeter,
              peer_reset: Callable[[], None] | None = None) -> tuple[dict[str, float], Any, dict[str, float], Any]:
    """One warm-up call of each, then `repeats` rounds of one ours call and one peer call.

    Alternating means a change in the host's load hits both sides alike. `peer_reset()` runs untimed
    before each peer call. Returns each side's timing (median/min/max, the warm-up's time and, for
    ours, the median JAX compile time inside a timed call: nonzero means it recompiles every call)
    and its last call's result.
    """
    first = {"ours": _once(ours, None, meter), "peer": _once(peer, peer_reset, meter)}
    calls: dict[str, list[tuple[float, float, Any]]] = {"ours": [], "peer": []}
    for _ in range(repeats):
        calls["ours"].append(_once(ours, None, meter))
        calls["peer"].append(_once(peer, peer_reset, meter))
    timings = {}
    for side, done in calls.items():
        walls = [wall for wall, _, _ in done]
        timings[side] = {
            "median_s": statistics.median(walls),
            "min_s": round(min(walls), 6),
            "max_s": round(max(walls), 6),
            "first_s": round(first[side][0], 6),
        }
        if side == "ours":
            timings[side] |= {"first_compile_s": round(first[side][1], 6),
                              "compile_s": round(statistics.median([c for _, c, _ in done]), 6)}
    return timings["ours"], calls["ours"][-1][2], timings["peer"], calls["peer"][-1][2]


def compare_row(scope: str, method: str, pattern: str, ours: dict[str, float], peer: dict[str, float]) -> dict:
    """The row both scopes share: names, both timings and `ratio` = ours / peer (medians)."""
    return {
        "scope": scope, "method": method, "pattern": pattern, "ours_pattern": OURS_PATTERN[method, pattern],
        "ours_s": round(ours["median_s"], 6), "peer_s": round(peer["median_s"], 6),
        "ratio": round(ours["median_s"] / peer["median_s"], 4),
        "ours": ours | {"median_s": round(ours["median_s"], 6)},
        "peer": peer | {"median_s": round(peer["median_s"], 6)},
    }


# --- one layer ---------------------------------------------------------------------------------------------------

def relative_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor, reference: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ (`reference` = XWᵀ), in float32 on the peer's device."""
    return float(torch.linalg.norm(x @ (dense - pruned).t()) / torch.linalg.norm(reference))


@torch.no_grad()
def float64_keep(method: str, pattern: str, weight: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """The peer's keep-mask computed in float64: what both float32 implementations approximate."""
    stats_class, prune_fn = PEER[method]
    stats = stats_class(weight.shape[1], weight.device, torch.float64)
    stats.add_batch(x.double())
    return prune_fn(weight.double(), stats, SPARSITY, *PEER_NM[pattern]).cpu().numpy()


def measure_layer(fan_in: int, fan_out: int, tokens: int, methods: Sequence[str], patterns: Sequence[str],
                  repeats: int, meter: CompileMeter, device: torch.device, seed: int = 0) -> list[dict[str, Any]]:
    """Ours (`layer_stats` + `prune_layer`) against the peer (`add_batch` + prune) on one kernel."""
    rng = np.random.default_rng(seed + 1)
    kernel = rng.standard_normal((fan_in, fan_out), np.float32) / np.float32(np.sqrt(fan_in))
    x = layer_inputs(tokens, fan_in, seed)
    kernel_ours, x_ours = jax.device_put(kernel), jax.device_put(x)
    weight = torch.from_numpy(np.ascontiguousarray(kernel.T)).to(device)  # torch layout: [out, in]
    x_peer = torch.from_numpy(x).to(device)
    with torch.no_grad():
        reference = x_peer @ weight.t()
    rows = []
    for pattern in patterns:
        for method in methods:
            ours_pattern = Pattern.parse(OURS_PATTERN[method, pattern])
            need_hessian = method == "sparsegpt"

            def ours_call(method: str = method, pattern: Pattern = ours_pattern, hessian: bool = need_hessian) -> Any:
                return jax.block_until_ready(prune_layer(method, kernel_ours, layer_stats(x_ours, hessian), pattern,
                                                         SPARSITY))

            peer_weight: dict[str, torch.Tensor] = {}

            def reset() -> None:
                peer_weight["w"] = weight.clone()

            @torch.no_grad()
            def peer_call(method: str = method, pattern: str = pattern) -> torch.Tensor:
                stats_class, prune_fn = PEER[method]
                stats = stats_class(fan_in, device)
                stats.add_batch(x_peer)
                keep = prune_fn(peer_weight["w"], stats, SPARSITY, *PEER_NM[pattern])
                sync(device)
                return keep

            ours_timing, (ours_kernel, ours_keep), peer_timing, peer_keep = time_pair(ours_call, peer_call, repeats,
                                                                                      meter, reset)
            ours_w = torch.from_numpy(np.ascontiguousarray(np.asarray(ours_kernel).T)).to(device)
            ours_keep_t = np.asarray(ours_keep).T
            peer_w, peer_keep_np = peer_weight["w"], peer_keep.cpu().numpy()
            exact = float64_keep(method, pattern, weight, x_peer)
            with torch.no_grad():
                rows.append(compare_row("layer", method, pattern, ours_timing, peer_timing) | {
                    "shape": [fan_in, fan_out], "tokens": tokens,
                    "mask_agreement": round(float(np.mean(ours_keep_t == peer_keep_np)), 6),
                    "weight_rel_diff": float(torch.linalg.norm(ours_w - peer_w) / torch.linalg.norm(peer_w)),
                    "ours_sparsity": round(1 - float(np.mean(ours_keep_t)), 6),
                    "peer_sparsity": round(1 - float(np.mean(peer_keep_np)), 6),
                    "ours_error": relative_error(x_peer, weight, ours_w, reference),
                    "peer_error": relative_error(x_peer, weight, peer_w, reference),
                    # How far each float32 mask is from the float64 one: the noise floor of the agreement.
                    "ours_vs_float64": round(float(np.mean(ours_keep_t == exact)), 6),
                    "peer_vs_float64": round(float(np.mean(peer_keep_np == exact)), 6),
                })
    return rows


# --- the whole model ---------------------------------------------------------------------------------------------

def language_linears(bundle: Any) -> dict[str, tuple[int, str]]:
    """`{our kernel path: (decoder layer index, HF module name in the layer)}` for the language tower's linears,
    read from the HF conversion rules (e.g. `language/blocks_0/attn/q/kernel` → `(0, "self_attn.q_proj")`)."""
    hf = bundle.metadata["hf"]
    linears = {}
    for rule in conversion_rules(bundle.config, hf["text_model_type"], Naming(**hf["naming"])):
        match = re.search(r"\.layers\.(\d+)\.(.+)\.weight$", rule.hf)
        if rule.layout == "linear" and match and rule.ours[0].startswith("language/"):
            linears[rule.ours[0]] = (int(match.group(1)), match.group(2))
    return linears


@torch.no_grad()
def last_hidden(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The language model's last hidden state over all calibration batches."""
    return torch.cat([model.model(input_ids=ids, pixel_values=pixels, use_cache=False).last_hidden_state
                      for ids, pixels in batches])


def measure_model(directory: Path, methods: Sequence[str], patterns: Sequence[str], samples: int, text_tokens: int,
                  batch_size: int, repeats: int, meter: CompileMeter, device: torch.device,
                  seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ours (`prune`, language tower, sequential) against the peer's layer-by-layer loop, same checkpoint and data."""
    from transformers import LlavaForConditionalGeneration

    bundle = load_hf_model(directory)
    params = jax.device_put(bundle.params)  # on the device before timing, as the peer's model is
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    linears = language_linears(bundle)
    modules = {path: decoder_layers(model)[index].get_submodule(name) for path, (index, name) in linears.items()}
    original = {path: m.weight.detach().clone() for path, m in modules.items()}
    images, tokens = calibration_inputs(bundle.config, samples, text_tokens, seed, BOS_ID, FIRST_TEXT_ID)
    # The loss ECoFLaP's importance differentiates: next-token prediction over the text after the image.
    carry = {"images": images, "tokens": tokens, "text_mask": np.ones(tokens.shape, bool),
             "target_mask": tokens >= FIRST_TEXT_ID}
    batches = [(torch.from_numpy(tokens[i : i + batch_size]).long().to(device),
                torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2))).to(device))
               for i in range(0, samples, batch_size)]

    def load(weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, m in modules.items():
                m.weight.copy_(weights[path])

    dense = last_hidden(model, batches)

    def torch_weights(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Our pruned kernels as the peer's `[out, in]` weights, on its device."""
        return {path: torch.from_numpy(np.ascontiguousarray(np.asarray(flat[path]).T)).to(device) for path in linears}

    def error_of(weights: dict[str, torch.Tensor]) -> float:
        """The relative change of the last hidden state with `weights` loaded (the originals restored after)."""
        load(weights)
        error = float(torch.linalg.norm(last_hidden(model, batches) - dense) / torch.linalg.norm(dense))
        load(original)
        return error

    rows = []
    for pattern in patterns:
        for method in methods:
            if (method, pattern) not in OURS_PATTERN:
                continue
            spec = SparsitySpec.language_only(SPARSITY, OURS_PATTERN[method, pattern])
            importance: dict[str, float] = {}

            def ours_call(spec: SparsitySpec = spec, method: str = method) -> Any:
                # `prune` copies its results to host (NumPy), so they are ready when it returns.
                if method not in ECOFLAP_ORDERS:
                    return prune(params, bundle.config, spec, method, carry, batch_size=batch_size)
                started = time.perf_counter()
                scores = importance_scores(params, bundle.config, carry, prunable_paths(params), ECOFLAP_ORDERS[method],
                                           jax.random.key(seed))
                importance["seconds"] = time.perf_counter() - started
                ratios = allocation_ratios(method, params, bundle.config, spec, None, scores=scores)
                return prune(params, bundle.config, spec, "wanda", carry, batch_size=batch_size, ratios=ratios)

            if method in OURS_ONLY:
                timing, result = time_calls(ours_call, repeats, meter)
                ours_flat = flatten(result.params)
                ours_weights = torch_weights(ours_flat)
                kept = sum(int(np.asarray(flat_masks(result.masks)[path]).sum()) for path in linears)
                total = sum(int(np.prod(np.shape(ours_flat[path]))) for path in linears)
                rows.append({
                    "scope": "model", "method": method, "pattern": pattern, "ours_pattern": OURS_PATTERN[method, pattern],
                    "ours_s": timing["median_s"], "peer_s": None, "ratio": None, "ours": timing,
                    "layers": len(linears), "calib_samples": samples, "calib_tokens": int(tokens.size),
                    "ours_phase_s": result.phases | ({"importance": round(importance["seconds"], 4)} if importance else {}),
                    "ours_sparsity": round(1 - kept / total, 6), "ours_error": error_of(ours_weights),
                })
                continue

            def peer_call(method: str = method, pattern: str = pattern) -> dict[tuple[int, str], torch.Tensor]:
                keeps = peer_prune_model(model, batches, method, pattern, SPARSITY)
                sync(device)
                return keeps

            ours_timing, result, peer_timing, peer_keeps = time_pair(ours_call, peer_call, repeats, meter,
                                                                     lambda: load(original))
            if set(peer_keeps) != set(linears.values()) or set(flat_masks(result.masks)) != set(linears):
                raise RuntimeError(f"the two sides pruned different linears: ours {sorted(flat_masks(result.masks))}, "
                                   f"the peer's {sorted(peer_keeps)}, mapped by the HF rules as {linears}")
            peer_weights = {path: m.weight.detach().clone() for path, m in modules.items()}
            peer_error = error_of(peer_weights)
            ours_flat, ours_masks = flatten(result.params), flat_masks(result.masks)
            ours_weights = torch_weights(ours_flat)
            ours_error = error_of(ours_weights)
            agreement, equal, total, diff, norm, ours_kept, peer_kept = {}, 0, 0, 0.0, 0.0, 0, 0
            for path, key in linears.items():
                ours_keep, peer_keep = np.asarray(ours_masks[path]).T, peer_keeps[key].cpu().numpy()
                same = int(np.sum(ours_keep == peer_keep))
                agreement[path] = same / ours_keep.size
                equal, total = equal + same, total + ours_keep.size
                ours_kept, peer_kept = ours_kept + int(ours_keep.sum()), peer_kept + int(peer_keep.sum())
                diff += float(torch.sum((ours_weights[path] - peer_weights[path]) ** 2))
                norm += float(torch.sum(peer_weights[path] ** 2))
            worst = min(agreement, key=agreement.get)
            rows.append(compare_row("model", method, pattern, ours_timing, peer_timing) | {
                "layers": len(linears), "calib_samples": samples, "calib_tokens": int(tokens.size),
                "ours_phase_s": result.phases,  # seconds per phase of our last timed call (`calibrate.PHASES`)
                "mask_agreement": round(equal / total, 6),
                "min_layer_agreement": round(agreement[worst], 6), "min_agreement_layer": worst,
                "layer_agreement": {path: round(value, 6) for path, value in agreement.items()},
                "weight_rel_diff": math.sqrt(diff / norm),
                "ours_sparsity": round(1 - ours_kept / total, 6), "peer_sparsity": round(1 - peer_kept / total, 6),
                "ours_error": ours_error, "peer_error": peer_error,
            })
    text = bundle.config.language
    described = {"language": {"width": text.width, "depth": text.depth, "mlp_dim": text.mlp_dim,
                              "heads": text.num_heads, "kv_heads": text.num_kv_heads, "vocab": text.vocab_size},
                 "image_tokens": bundle.config.num_image_tokens, "sequence_length": int(tokens.shape[1])}
    return rows, described


# --- report ------------------------------------------------------------------------------------------------------

def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per (scope, method, pattern)."""
    print(f"{'scope':<6}{'size':>11}{'method':>15}{'pattern':>14}{'ours s':>10}{'peer s':>10}{'x peer':>8}"
          f"{'mask agree':>12}{'min layer':>11}{'W rel diff':>12}{'err ours':>10}{'err peer':>10}"
          f"{'vs f64 ours/peer':>19}")
    for r in rows:
        size = "x".join(map(str, r["shape"])) if r["scope"] == "layer" else f"{r['layers']} lin"
        worst = f"{r['min_layer_agreement']:.4f}" if "min_layer_agreement" in r else "-"
        exact = f"{r['ours_vs_float64']:.4f}/{r['peer_vs_float64']:.4f}" if "ours_vs_float64" in r else "-"
        cell = lambda key, width, spec: f"{'-' if r.get(key) is None else format(r[key], spec):>{width}}"  # noqa: E731
        print(f"{r['scope']:<6}{size:>11}{r['method']:>15}{r['pattern']:>14}{r['ours_s']:>10.3f}"
              f"{cell('peer_s', 10, '.3f')}{cell('ratio', 8, '.2f')}{cell('mask_agreement', 12, '.4f')}{worst:>11}"
              f"{cell('weight_rel_diff', 12, '.2e')}{r['ours_error']:>10.4f}{cell('peer_error', 10, '.4f')}{exact:>19}")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else the architecture)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.machine()


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when PyTorch sees a GPU, else the CPU; asking for `cuda` without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device (allowed: auto, cpu, cuda)")
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"a benchmarks/llava.py preset (quick, small, 1b) or a JSON file of its keys "
                                         f"(default {FULL['config']}; --quick: {QUICK['config']})")
    parser.add_argument("--dir", help="where to build the checkpoint; one already there (config.json present) is used "
                                      "as it is (default: a temporary directory)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--layer-size", type=parse_layer_size, help=f"N or INxOUT (default {FULL['layer_size']})")
    parser.add_argument("--layer-tokens", type=positive_int, help=f"default {FULL['layer_tokens']}")
    parser.add_argument("--calib-samples", type=positive_int, help=f"default {FULL['calib_samples']}")
    parser.add_argument("--text-tokens", type=positive_int,
                        help=f"text tokens per calibration sample after BOS and the image tokens "
                             f"(default {FULL['text_tokens']})")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"calibration samples per forward call, both sides (default {FULL['batch_size']})")
    parser.add_argument("--repeats", type=positive_int,
                        help=f"timed rounds after one warm-up (default {FULL['repeats']})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the PyTorch peer runs (ours runs on JAX's default backend)")
    parser.add_argument("--threads", type=positive_int,
                        help=f"PyTorch's CPU threads for the peer (default: every core, {os.cpu_count()} here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for a smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", default="results/peer_prune.json")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    config_name = pick("config")
    sizes = llava_sizes(config_name)
    fan_in, fan_out = args.layer_size or parse_layer_size(defaults["layer_size"])
    tokens, samples, repeats = pick("layer_tokens"), pick("calib_samples"), pick("repeats")
    text_tokens, batch_size = pick("text_tokens"), pick("batch_size")
    for pattern in args.patterns:
        Pattern.parse(pattern).check_shape((fan_in, fan_out), what="--layer-size")
    device = pick_device(args.device)
    # JAX would otherwise take 75% of a GPU's memory at start-up, leaving the peer too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Full float32 matmuls on both sides: PyTorch's default, while XLA on a GPU would use TF32.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    # XLA's CPU backend flushes denormal floats to zero; PyTorch does not by default, and SparseGPT's
    # updates produce enough of them to slow its column loop down tens of times on a CPU.
    flush_denormal = torch.set_flush_denormal(True)

    meter = CompileMeter()
    load_before = os.getloadavg()
    rows, model_info, built = [], None, False
    if "layer" in args.scopes:
        peered = [m for m in args.methods if m in PEERED]  # the other methods are timed on the whole model only
        rows += measure_layer(fan_in, fan_out, tokens, peered, args.patterns, repeats, meter, device, args.seed)
    if "model" in args.scopes:
        with tempfile.TemporaryDirectory(prefix="peer_prune_") as tmp:
            directory = Path(args.dir) if args.dir else Path(tmp) / "llava"
            built = not (directory / "config.json").is_file()
            if built:
                build_checkpoint(directory, sizes, args.seed)
            model_rows, model_info = measure_model(directory, args.methods, args.patterns, samples, text_tokens,
                                                   batch_size, repeats, meter, device, args.seed)
            rows = model_rows + rows
    print_table(rows)
    out = {
        "benchmark": "peer_prune",
        "quick": args.quick,
        "config": config_name,
        "sizes": sizes if built else None,
        "dir": args.dir,
        "model": model_info,
        "sparsity": SPARSITY,
        "towers": ["language"],
        "calibration": {"samples": samples, "text_tokens": text_tokens, "batch_size": batch_size,
                        "mode": "sequential", "data": "random images and token ids, no padding"},
        "layer": {"shape": [fan_in, fan_out], "tokens": tokens},
        "repeats": repeats,
        "warmup": 1,
        "dtype": "float32",
        "jax_matmul_precision": "highest",
        "peer": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "device": device.type,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "flush_denormal": flush_denormal,
        },
        "results": rows,
    }
    write_results(args.json, out, load_before[0])


if __name__ == "__main__":
    main()
