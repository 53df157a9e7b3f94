"""SparseLoRA restoration step: ours (JAX) against a PyTorch peer doing the same job, on the same model and batch.

Both sides train the same random-weight HF LLaVA (`benchmarks/llava.py`, `--config`), built once and
loaded by each: ours with `load_hf_model` and the restoration step (mode sparselora); the peer is
transformers' own `LlavaForConditionalGeneration` with PEFT LoRA. The job is identical:

- masks: one magnitude prune of the vision and language towers (`prune`, 50%, `--pattern`), handed to
  the peer under its parameter names by the loader's own conversion rules (`to_hf`);
- LoRA: the paper's targets and ranks (`LoraConfig()`: vision 4, connector 2, language 8,
  alpha 16), given to PEFT as the exact HF modules behind our target paths, ranks by `rank_pattern`;
  A random, B zero on both sides;
- forward: each adapted Linear computes F.linear(x, (W + s·B@A) ⊙ M, b), a masked Linear without LoRA
  W ⊙ M (the peer patches the PEFT layers' forward: `sparse_linear_forward`);
- loss: (1 − λ)·CE on the answer tokens + λ·KL(teacher ‖ student), λ = 0.1, T = 1, where the teacher is
  the same base weights with neither masks nor LoRA (the peer: `dense_teacher`, under `no_grad`);
- optimizer: AdamW (β = 0.9, 0.98, no decay) at a constant `--lr` on the LoRA factors only, gradients
  clipped to global norm 1.

Since B = 0 the first step's loss is the pruned model's on both sides: `loss_ours` and `loss_peer` must
agree (in float32 the run stops before timing if they differ by more than 1e-3 relative). A zero B
leaves A's gradient zero, so after the timed steps both sides also load one shared LoRA state with B
≠ 0 (as after training starts; `lora_state_*.safetensors`, the same arrays under each side's names) and
report the gradient of the same loss with respect to every factor: `grad_rel_diff` is the largest
relative difference ‖g_ours − g_peer‖ / ‖g_peer‖ over the factors (in float32 it must stay within
`GRAD_TOLERANCE`, or the run fails).

Each side runs in its own fresh process (so neither shares the other's peak memory), both alive at once:
they import their libraries while the parent builds the checkpoint, masks and batch, then load, set up
and run `--warmup` untimed steps; the parent then times `--repeats` steps round-robin, ours then the
peer, one step at a time while the other waits, so a change in the host's load hits both alike; the
median is reported. Memory on CPU is the growth of the process's peak RSS (`VmHWM`, reset through
`/proc/self/clear_refs` before the timed steps) over its RSS after the imports, i.e. what the job itself
holds at its peak (weights, masks, LoRA and optimizer state, compiled code, and the step's transients);
ours also reports XLA's `memory_analysis()` of the compiled step. On a GPU it is the device allocator's
peak over the process: `torch.cuda.max_memory_allocated` against JAX's `peak_bytes_in_use`.

Model FLOPs per step (for TFLOP/s and MFU), with M = 2·Σ_k |W_k|·tokens_k the matmul FLOPs of one
forward pass (every linear kernel, the LM head and the patch embedding, each times the tokens it
sees; embedding lookups excluded), A = 4·S²·width per attention layer and sequence (QKᵀ and AV), and
M_lora the part of M in adapted kernels:

    FLOPs = 2·(M + A)    student and teacher forward passes
          + (M + 2·A)    gradients with respect to the activations
          + M_lora       ∂L/∂W_eff of every adapted kernel: SparseLoRA's (W + s·B@A) ⊙ M is not low rank,
                         so reaching B and A takes the full weight gradient (no other weight gradients)

which is ≈ 8·N·tokens when nearly every weight is adapted. MFU = FLOPs / step time / the device's
dense bf16 peak (`PEAK_BF16_FLOPS`; null for float32 or an unknown device).

    python benchmarks/peer_train_step.py [--config small|quick|1b|FILE.json] [--dtype float32|bfloat16]
        [--batch-size 4] [--repeats 10] [--warmup 2] [--dir CHECKPOINT] [--json results/peer_train_step.json]
    python benchmarks/peer_train_step.py --quick     # config quick, batch 2, 3 repeats, 2 warm-ups (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Sequence

import numpy as np

from sparsevlm.config import REMAT_MODES

if TYPE_CHECKING:
    import torch

# Both sides share one GPU from separate processes: without this JAX reserves 75% of it at start-up.
# Its peak figure comes from the allocator's own counter either way.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SIDES = ("ours", "peer")
IMPLEMENTATIONS = {"ours": "sparsevlm restoration step (JAX)", "peer": "transformers + PEFT LoRA (PyTorch)"}
SPARSITY = 0.5
# LoRA ranks and alpha, KL weight λ and temperature: `RestoreConfig`'s defaults (the paper's), passed to
# both sides in the spec.
GRAD_CLIP = 1.0
BETAS = (0.9, 0.98)  # make_optimizer's
LOSS_TOLERANCE = 1e-3  # relative, first-step loss in float32
GRAD_TOLERANCE = 1e-3  # relative (Frobenius), each LoRA factor's gradient in float32
FULL = {"config": "small", "batch_size": 4, "text_tokens": 48, "repeats": 10, "warmup": 2}
QUICK = {"config": "quick", "batch_size": 2, "text_tokens": 16, "repeats": 3, "warmup": 2}
# Dense bf16 tensor-core peak in FLOP/s, by device-name fragment (first match wins).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
PREFIX = "PEER_TRAIN_STEP "  # marks the children's protocol lines on stdout
MIB = 2**20


# ---------------------------------------------------------------------------------------------------
# Measuring helpers shared by both children.


def status_mib(field: str) -> float:
    """A `VmRSS`/`VmHWM` field of /proc/self/status in MiB (NaN where there is no /proc)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's freed heap back to the OS, so RSS shows what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Set the peak RSS (`VmHWM`) back to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (unknown device, or not a bf16 run)."""
    if dtype != "bfloat16":
        return None
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in device_name), None)


def emit(kind: str, payload: dict[str, Any]) -> None:
    """A child's protocol line: `PREFIX kind {json}`."""
    print(f"{PREFIX}{kind} {json.dumps(payload)}", flush=True)


class Side:
    """One side's trainer in its child process: `setup()` builds it from the files in `work`, `step()` trains."""

    def setup(self, work: Path, spec: dict[str, Any]) -> dict[str, Any]:
        """Load the model, masks, LoRA, optimizer and batch; returns what the report says about this side."""
        raise NotImplementedError

    def step(self) -> float:
        """One step, waited for; returns its loss."""
        raise NotImplementedError

    def gradients(self, work: Path) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and its gradient with respect to each LoRA factor at the shared state in `work`.

        Keys are our factor paths (`<kernel path>/a`, `/b`); the state replaces the side's own.
        """
        raise NotImplementedError

    def memory(self) -> dict[str, Any]:
        """Device memory figures (GPU only)."""
        return {}


# ---------------------------------------------------------------------------------------------------
# Ours: the library's restoration step.


class Ours(Side):
    """`make_train_step(restoration_loss(...))` in mode sparselora on the HF checkpoint loaded by `load_hf_model`."""

    def setup(self, work: Path, spec: dict[str, Any]) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp
        from safetensors.numpy import load_file

        from sparsevlm.config import RestoreConfig
        from sparsevlm.hf.load import load_hf_model
        from sparsevlm.lora import init_lora, lora_param_count
        from sparsevlm.masks import masks_from_flat
        from sparsevlm.models.vlm import VLM, scan_stacks
        from sparsevlm.restoration import step_inputs
        from sparsevlm.train import TrainState, make_optimizer, make_train_step, restoration_loss

        from train_step import xla_memory

        bundle = load_hf_model(spec["dir"], spec["dtype"])
        config = bundle.config
        host_masks = masks_from_flat(bundle.params, load_file(work / "masks_ours.safetensors"))
        lora_config = RestoreConfig().lora  # the paper's targets, ranks and alpha
        lora = init_lora(bundle.params, lora_config, jax.random.key(spec["seed"]))
        # The step's layout: scanned stacks (with --scan-layers) and masks packed to 1 bit per weight.
        self.stacks = scan_stacks(config) if spec["scan_layers"] else {}
        params, masks, lora = jax.device_put(step_inputs(bundle.params, host_masks, lora, self.stacks))
        del bundle, host_masks  # the host copies: the step reads the device arrays only
        batch = load_file(work / "batch.safetensors")
        self.batch = jax.device_put({
            "images": np.ascontiguousarray(batch["pixel_values"].transpose(0, 2, 3, 1)),  # NCHW → NHWC
            "tokens": batch["input_ids"].astype(np.int32),
            "text_mask": batch["attention_mask"].astype(bool),
            "loss_mask": batch["loss_mask"].astype(bool),
        })
        # Constant learning rate (no warm-up, end = peak), weight decay 0, clipping at GRAD_CLIP.
        optimizer = make_optimizer(spec["lr"], spec["lr"], 0, 1000, 0.0, GRAD_CLIP)
        model = VLM(config, jnp.bfloat16 if spec["dtype"] == "bfloat16" else jnp.float32, spec["scan_layers"],
                    spec["remat"])
        self.loss_fn = restoration_loss(model, lora_config.alpha, "sparselora", spec["kl_weight"],
                                        spec["temperature"])
        step = make_train_step(self.loss_fn, optimizer)
        self.state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32))
        self.params, self.masks = params, masks
        started = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch, params, masks).compile()
        self.device = jax.devices()[0]
        return {"device": str(self.device.device_kind), "compile_s": round(time.perf_counter() - started, 3),
                "trainable_params": lora_param_count(lora), "xla_memory": xla_memory(self.compiled)}

    def step(self) -> float:
        import jax

        self.state, metrics = self.compiled(self.state, self.batch, self.params, self.masks)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def gradients(self, work: Path) -> tuple[float, dict[str, np.ndarray]]:
        import jax
        from safetensors.numpy import load_file

        from sparsevlm.models.stages import stack_layers, unstack_layers
        from sparsevlm.tree import flatten, unflatten

        lora = stack_layers(unflatten(load_file(work / "lora_state_ours.safetensors")), self.stacks)
        # Params and masks as arguments, not closure constants (which XLA would fold into the executable).
        grad = jax.jit(jax.value_and_grad(lambda lora, batch, params, masks: self.loss_fn(lora, batch, params, masks)[0]))
        loss, grads = grad(lora, self.batch, self.params, self.masks)
        grads = unstack_layers(jax.device_get(grads), self.stacks)
        return float(loss), {path: np.asarray(g) for path, g in flatten(grads).items()}

    def memory(self) -> dict[str, Any]:
        stats = self.device.memory_stats() if self.device.platform == "gpu" else None
        if not stats:
            return {}
        return {"device_peak_mib": round(stats["peak_bytes_in_use"] / MIB, 1),
                "device_in_use_mib": round(stats["bytes_in_use"] / MIB, 1)}


# ---------------------------------------------------------------------------------------------------
# The peer: transformers' LLaVA with PEFT LoRA, SparseLoRA as the paper applies it.


@dataclasses.dataclass
class MaskSwitch:
    """Whether the patched Linears apply their masks (off inside `dense_teacher`)."""

    on: bool = True


def sparse_linear_forward(layer: Any, adapted: bool, mask: "torch.Tensor | None", switch: MaskSwitch,
                          x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
    """F.linear(x, (W + s·B@A) ⊙ M, b) for a PEFT `lora.Linear` (`adapted`), F.linear(x, W ⊙ M, b) for a Linear.

    Replaces the layer's forward (PEFT's extra keyword arguments, e.g. per-row adapter names, are not
    supported). PEFT's own forward adds the low-rank path x·Aᵀ·Bᵀ to the masked base output, which is
    W⊙M + s·B@A (`lora` mode), not SparseLoRA. The effective weight is built per call and autograd keeps
    it for the backward pass, as a plain PyTorch implementation of the paper does. With the adapters
    disabled (PEFT's `disable_adapter`) the LoRA term is left out; with the switch off, the mask.
    """
    import torch
    import torch.nn.functional as F

    base = layer.get_base_layer() if adapted else layer
    weight = base.weight
    if adapted and not layer.disable_adapters:
        for adapter in layer.active_adapters:
            # s·B@A, computed in the factors' dtype (float32) and added in the weight's, as ours does.
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    if mask is not None and switch.on:
        weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return F.linear(x, weight, base.bias)


class Peer(Side):
    """transformers' `LlavaForConditionalGeneration` + PEFT LoRA, every adapted/masked Linear patched."""

    def setup(self, work: Path, spec: dict[str, Any]) -> dict[str, Any]:
        import functools

        import peft
        import torch
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
        model = LlavaForConditionalGeneration.from_pretrained(spec["dir"], dtype=dtype).to(self.device)
        targets: dict[str, int] = spec["lora_modules"]
        self.lora_paths: dict[str, str] = spec["lora_paths"]  # HF module → our kernel path
        torch.manual_seed(spec["seed"])
        lora_config = peft.LoraConfig(
            r=max(targets.values()), lora_alpha=spec["alpha"], lora_dropout=0.0, bias="none",
            target_modules=sorted(targets),  # full module names: exactly these, no suffix matches
            rank_pattern={re.escape(name): rank for name, rank in targets.items()},
        )
        self.peft_model = peft.get_peft_model(model, lora_config)  # wraps `model`'s Linears in place
        self.model = model
        masks = load_file(str(work / "masks_peer.safetensors"), device=str(self.device))
        modules = {name.removesuffix(".weight") for name in masks} | set(targets)
        self.switch = MaskSwitch()
        for name in sorted(modules):
            layer = model.get_submodule(name)
            adapted = isinstance(layer, LoraLayer)
            if adapted != (name in targets):
                raise RuntimeError(f"PEFT {'adapted' if adapted else 'did not adapt'} {name}, contrary to the targets")
            layer.forward = functools.partial(sparse_linear_forward, layer, adapted, masks.get(f"{name}.weight"),
                                              self.switch)
        model.train()  # dropout is 0 throughout: train and eval mode compute the same
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=spec["lr"], betas=BETAS, eps=1e-8, weight_decay=0.0)
        batch = load_file(str(work / "batch.safetensors"), device=str(self.device))
        self.inputs = {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long(),
                       "pixel_values": batch["pixel_values"].to(dtype), "use_cache": False}
        self.loss_mask = batch["loss_mask"].bool()
        self.text_mask = batch["attention_mask"].bool()
        self.temperature, self.kl_weight = spec["temperature"], spec["kl_weight"]
        if self.device.type == "cuda":
            device_name = torch.cuda.get_device_name(self.device)
        else:
            import platform

            device_name = platform.processor() or platform.machine()
        return {"device": device_name, "trainable_params": sum(p.numel() for p in self.trainable),
                "torch_threads": torch.get_num_threads(), "adapted_modules": len(targets),
                "masked_modules": len(masks)}

    @contextlib.contextmanager
    def dense_teacher(self) -> Iterator[None]:
        """The same base weights with neither masks nor LoRA, without gradients."""
        import torch

        self.switch.on = False
        try:
            with self.peft_model.disable_adapter(), torch.no_grad():
                yield
        finally:
            self.switch.on = True

    def loss(self, student: "torch.Tensor", teacher: "torch.Tensor") -> "torch.Tensor":
        """(1 − λ)·CE on the answer tokens + λ·KL(teacher ‖ student) over next-token positions, in float32."""
        import torch.nn.functional as F

        tokens = self.inputs["input_ids"]
        predicted = student[:, :-1].float()
        ce_mask = self.loss_mask[:, 1:].float()
        ce = F.cross_entropy(predicted.transpose(1, 2), tokens[:, 1:], reduction="none")
        ce = (ce * ce_mask).sum() / ce_mask.sum().clamp(min=1.0)
        log_student = F.log_softmax(predicted / self.temperature, dim=-1)
        log_teacher = F.log_softmax(teacher[:, :-1].float() / self.temperature, dim=-1)
        per_position = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1)
        kl_mask = (self.text_mask[:, 1:] & self.text_mask[:, :-1]).float()
        kl = (per_position * kl_mask).sum() / kl_mask.sum().clamp(min=1.0)
        return (1.0 - self.kl_weight) * ce + self.kl_weight * kl

    def step(self) -> float:
        import torch

        loss = self.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP)
        self.optimizer.step()
        return float(loss.item())  # waits for the device

    def backward(self) -> "torch.Tensor":
        """The loss, with the LoRA factors' gradients left in their `.grad`."""
        with self.dense_teacher():
            teacher = self.model(**self.inputs).logits
        student = self.model(**self.inputs).logits
        loss = self.loss(student, teacher)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def gradients(self, work: Path) -> tuple[float, dict[str, np.ndarray]]:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(work / "lora_state_peer.safetensors"), device=str(self.device))
        factors = {}
        with torch.no_grad():
            for module, path in self.lora_paths.items():
                layer = self.model.get_submodule(module)
                for ours, theirs in (("a", layer.lora_A["default"]), ("b", layer.lora_B["default"])):
                    theirs.weight.copy_(state[f"{module}.{ours}"])
                    factors[f"{path}/{ours}"] = theirs.weight
        loss = self.backward()
        return float(loss.item()), {path: weight.grad.float().cpu().numpy() for path, weight in factors.items()}

    def memory(self) -> dict[str, Any]:
        import torch

        if self.device.type != "cuda":
            return {}
        return {"device_peak_mib": round(torch.cuda.max_memory_allocated(self.device) / MIB, 1),
                "device_in_use_mib": round(torch.cuda.memory_allocated(self.device) / MIB, 1)}


def import_libraries(side: str) -> None:
    """Import (and start) what a side uses, so library start-up stays out of its memory figures."""
    import torch

    # JAX's CPU client uses every core; give PyTorch the same.
    torch.set_num_threads(os.cpu_count() or 1)
    if side == "ours":
        import jax.numpy as jnp

        for module in ("sparsevlm.hf.load", "sparsevlm.train"):
            importlib.import_module(module)
        jnp.ones(8).sum().block_until_ready()
    else:
        import transformers

        importlib.import_module("peft")
        transformers.LlavaForConditionalGeneration  # a lazy import: do it now

        torch.ones(8).sum().item()
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")


def child(side: str, work: Path) -> None:
    """A side's process: import, wait for `setup`, set up and warm up, then answer `step` / `finish`."""
    import_libraries(side)  # while the parent builds the checkpoint and the masks
    if sys.stdin.readline().strip() != "setup":
        return  # the parent gave up before the setup
    spec = json.loads((work / "spec.json").read_text())
    if side == "ours":
        # `load_hf_model` reads the processor too: reading it first keeps the library code it imports
        # (tokenizers, image processing) out of the memory figures, like the imports.
        from sparsevlm.hf.processor import load_processor

        load_processor(spec["dir"])
    release_freed_memory()
    imports_mib = status_mib("VmRSS")
    trainer: Side = Ours() if side == "ours" else Peer()
    started = time.perf_counter()
    info = trainer.setup(work, spec)
    losses = [trainer.step() for _ in range(spec["warmup"])]
    info["setup_s"] = round(time.perf_counter() - started, 3)
    release_freed_memory()
    info["peak_reset"] = reset_peak()
    held_mib = status_mib("VmRSS")
    emit("ready", info | {"first_loss": losses[0]})
    steps_peak_mib, steps_memory = None, None  # the timed steps' peaks, read before the gradient check
    for line in sys.stdin:
        request = line.strip()
        if request == "step":
            start = time.perf_counter()
            loss = trainer.step()
            emit("step", {"seconds": time.perf_counter() - start, "loss": loss})
        elif request == "gradients":
            steps_peak_mib, steps_memory = status_mib("VmHWM"), trainer.memory()
            loss, grads = trainer.gradients(work)
            from safetensors.numpy import save_file

            save_file({path: np.ascontiguousarray(g, np.float32) for path, g in grads.items()},
                      str(work / f"grads_{side}.safetensors"))
            emit("gradients", {"loss": loss, "factors": len(grads)})
        elif request == "finish":
            peak_mib = steps_peak_mib if steps_peak_mib is not None else status_mib("VmHWM")
            emit("done", {"rss": {"imports_mib": round(imports_mib, 1), "held_mib": round(held_mib - imports_mib, 1),
                                  "step_peak_mib": round(peak_mib - imports_mib, 1),
                                  "step_growth_mib": round(peak_mib - held_mib, 1)},
                          "device_memory": steps_memory if steps_memory is not None else trainer.memory()})
            return
        else:
            raise ValueError(f"unknown request {request!r}")


# ---------------------------------------------------------------------------------------------------
# The parent: one checkpoint, masks, targets and batch for both; children timed round-robin.


class Child:
    """A side's child process, spoken to one line at a time."""

    def __init__(self, side: str, work: Path) -> None:
        self.side = side
        self.stderr_path = work / f"{side}.stderr"
        self.stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--work", str(work)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def read(self, kind: str) -> dict[str, Any]:
        """The next protocol line of this kind (other output is skipped); a clear error if the child died."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                got, payload = line[len(PREFIX):].split(" ", 1)
                if got != kind:
                    raise RuntimeError(f"{self.side} child sent {got!r}, expected {kind!r}")
                return json.loads(payload)
        self.died()

    def died(self) -> NoReturn:
        """Raise the error of a child that exited early, with the end of its stderr."""
        self.proc.wait()
        self.stderr.flush()
        raise RuntimeError(f"the {self.side} side exited with {self.proc.returncode}:\n"
                           f"{self.stderr_path.read_text()[-4000:]}")

    def send(self, command: str) -> None:
        """Write one request line."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.died()

    def request(self, command: str, kind: str) -> dict[str, Any]:
        """Send a request and read its answer."""
        self.send(command)
        return self.read(kind)

    def close(self) -> None:
        """Stop the child if it still runs (after an error) and release its files."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def make_batch(batch_size: int, image_tokens: int, text_tokens: int, vocab_size: int, image_size: int,
               image_token_id: int, bos_id: int, seed: int) -> dict[str, np.ndarray]:
    """`[BOS, <image>×N, text…]` rows of random tokens and images; the last quarter of the text is the answer.

    HF LLaVA needs exactly `image_seq_length` placeholders per image; no padding, so positions agree.
    """
    rng = np.random.default_rng(seed)
    length = image_tokens + text_tokens
    tokens = rng.integers(5, vocab_size, (batch_size, length))  # 0-4: pad, unk, bos, eos, image
    tokens[:, 0] = bos_id
    tokens[:, 1:1 + image_tokens] = image_token_id
    loss_mask = np.zeros((batch_size, length), bool)
    loss_mask[:, -max(1, text_tokens // 4):] = True
    return {"input_ids": tokens.astype(np.int64), "attention_mask": np.ones((batch_size, length), np.int64),
            "loss_mask": loss_mask, "pixel_values": rng.standard_normal((batch_size, 3, image_size, image_size),
                                                                        dtype=np.float32)}


def step_flops(config: Any, shapes: dict[str, tuple[int, ...]], adapted: set[str], batch_size: int,
               length: int) -> dict[str, float]:
    """Model FLOPs of one restoration step (formula in the module docstring), and its parts."""
    vision = config.vision
    vision_tokens = vision.num_patches + int(vision.use_cls_token)
    tokens = {"vision": batch_size * vision_tokens, "connector": batch_size * config.num_image_tokens,
              "language": batch_size * length}
    matmul = lora_matmul = 0.0
    for path, shape in shapes.items():
        if path.startswith("unused/") or not path.endswith("kernel") or len(shape) < 2:
            continue
        seen = batch_size * vision.num_patches if path == "vision/patch_embed/kernel" else tokens[path.split("/")[0]]
        flops = 2.0 * float(np.prod(shape)) * seen
        matmul += flops
        lora_matmul += flops if path in adapted else 0.0
    if "language/lm_head/kernel" not in shapes:  # tied head: the embedding table is the output matmul
        matmul += 2.0 * float(np.prod(shapes["language/embed/embedding"])) * tokens["language"]
    language = config.language
    attention = 4.0 * batch_size * (vision.blocks_used * vision_tokens**2 * vision.width
                                    + language.depth * length**2 * language.num_heads * language.resolved_head_dim)
    total = 2 * (matmul + attention) + (matmul + 2 * attention) + lora_matmul
    return {"step": total, "forward_matmul": matmul, "forward_attention": attention, "adapted_matmul": lora_matmul}


def prepare(directory: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the batch, both sides' masks and the spec to `work`; return what the report needs."""
    import jax
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from sparsevlm.config import RestoreConfig, SparsitySpec
    from sparsevlm.hf.load import PAPER_LORA_MODULES, conversion_rules, hf_modules, load_hf_model, naming
    from sparsevlm.hf.rules import to_hf
    from sparsevlm.lora import lora_targets
    from sparsevlm.masks import flat_masks
    from sparsevlm.pruning import prune
    from sparsevlm.tree import count_params, flatten

    bundle = load_hf_model(directory, "float32")
    config = bundle.config
    if config.family != "llava" or config.language.arch != "llama":
        raise SystemExit(f"{directory}: this benchmark needs a LLaVA checkpoint with a Llama decoder")
    hf_config = AutoConfig.from_pretrained(directory)
    if hf_config.image_seq_length != config.num_image_tokens:
        raise SystemExit(f"{directory}: image_seq_length={hf_config.image_seq_length} but the vision tower gives "
                         f"{config.num_image_tokens} tokens per image")
    # The masks: one magnitude prune, on the host (a GPU stays free for the two sides).
    with jax.default_device(jax.devices("cpu")[0]):
        masks = flat_masks(prune(bundle.params, config, SparsitySpec.same(SPARSITY, args.pattern),
                                 "magnitude").masks)
    restore = RestoreConfig()
    lora_config = restore.lora
    targets = lora_targets(bundle.params, lora_config)
    wanted = PAPER_LORA_MODULES["clip"] | PAPER_LORA_MODULES["mlp"] | PAPER_LORA_MODULES["llama"]
    if hf_modules(bundle, targets) != wanted:
        raise RuntimeError(f"our LoRA targets are HF modules {sorted(hf_modules(bundle, targets))}, not the paper's")

    # Our paths → the peer's parameter names, by the loader's own rules for transformers' in-memory
    # names (read off a weightless copy of the model).
    with torch.device("meta"):
        names = list(LlavaForConditionalGeneration(hf_config).state_dict())
    rules = conversion_rules(config, hf_config.text_config.model_type, naming("llava", names, directory))
    weight_of = {path: r.hf for r in rules if r.layout == "linear" for path in r.ours}
    lora_modules = {weight_of[path].removesuffix(".weight"): rank for path, rank in targets.items()}
    peer_masks = dict(to_hf([r for r in rules if r.ours and set(r.ours) <= set(masks)], masks))
    if len(peer_masks) != len(masks) or not set(peer_masks) <= set(names):
        raise RuntimeError("the masks do not map one-to-one onto the peer's parameters")

    seq_len = config.num_image_tokens + args.text_tokens
    batch = make_batch(args.batch_size, config.num_image_tokens, args.text_tokens, config.language.vocab_size,
                       config.vision.image_size, config.image_token_id, int(hf_config.text_config.bos_token_id),
                       args.seed)
    save_file(batch, str(work / "batch.safetensors"))
    save_file({p: np.asarray(m, bool) for p, m in masks.items()}, str(work / "masks_ours.safetensors"))
    save_file({n: np.ascontiguousarray(m, bool) for n, m in peer_masks.items()}, str(work / "masks_peer.safetensors"))
    spec = {"dir": str(directory), "dtype": args.dtype, "lr": args.lr, "seed": args.seed, "warmup": args.warmup,
            "scan_layers": args.scan_layers, "remat": args.remat,
            "alpha": lora_config.alpha, "kl_weight": restore.kl_weight, "temperature": restore.temperature,
            "lora_modules": lora_modules}
    # One LoRA state with B ≠ 0 for the gradient check, the same arrays under both sides' names: A as
    # initialised (uniform ±1/√in), B small and random (zero would leave A's gradient zero).
    rng = np.random.default_rng(args.seed + 1)
    lora_state = {}
    for path, rank in sorted(targets.items()):
        fan_in, fan_out = np.shape(flatten(bundle.params)[path])
        bound = 1.0 / np.sqrt(fan_in)
        lora_state[path] = (rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32),
                            (0.02 * rng.standard_normal((fan_out, rank))).astype(np.float32))
    save_file({f"{path}/{name}": f for path, (a, b) in lora_state.items() for name, f in (("a", a), ("b", b))},
              str(work / "lora_state_ours.safetensors"))
    module_of = {path: weight_of[path].removesuffix(".weight") for path in targets}
    save_file({f"{module_of[path]}.{name}": f for path, (a, b) in lora_state.items() for name, f in (("a", a), ("b", b))},
              str(work / "lora_state_peer.safetensors"))
    spec["lora_paths"] = {module: path for path, module in module_of.items()}
    (work / "spec.json").write_text(json.dumps(spec))
    shapes = {path: tuple(np.shape(v)) for path, v in flatten(bundle.params).items()}
    return {
        "params": count_params({k: v for k, v in bundle.params.items() if k != "unused"}),
        "ranks": {tower: getattr(restore.lora, f"{tower}_rank") for tower in ("vision", "connector", "language")},
        "alpha": lora_config.alpha,
        "kl_weight": restore.kl_weight,
        "temperature": restore.temperature,
        "sequence_length": seq_len,
        "image_tokens": config.num_image_tokens,
        "answer_tokens": int(batch["loss_mask"][0].sum()),
        "lora_modules": len(lora_modules),
        "masked_weights": len(masks),
        "kept_fraction": round(float(sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())), 4),
        "flops": step_flops(config, shapes, set(targets), args.batch_size, seq_len),
    }


def compare_gradients(work: Path, at_state: dict[str, dict], dtype: str) -> dict[str, Any]:
    """Both sides' gradients at the shared LoRA state: the largest relative difference over the factors."""
    from safetensors.numpy import load_file

    ours, peer = (load_file(work / f"grads_{side}.safetensors") for side in SIDES)
    if set(ours) != set(peer):
        raise RuntimeError(f"the sides report gradients of different factors: {sorted(set(ours) ^ set(peer))[:4]}")
    diffs = {path: float(np.linalg.norm(ours[path] - peer[path]) / max(np.linalg.norm(peer[path]), 1e-30))
             for path in sorted(ours)}
    worst = max(diffs, key=diffs.get)
    if dtype == "float32" and diffs[worst] > GRAD_TOLERANCE:
        raise SystemExit(f"gradients disagree at the shared LoRA state: {worst} differs by {diffs[worst]:.2e} "
                         f"relative > {GRAD_TOLERANCE}")
    return {"grad_factors": len(diffs), "grad_rel_diff": diffs[worst], "grad_worst_factor": worst,
            "grad_zero_factors": sum(float(np.abs(peer[p]).max()) == 0.0 for p in peer),
            "loss_at_state_ours": at_state["ours"]["loss"], "loss_at_state_peer": at_state["peer"]["loss"]}


def time_round_robin(children: dict[str, Child], repeats: int) -> dict[str, list[float]]:
    """`repeats` steps per side, alternating, one running at a time; their wall times in seconds."""
    times: dict[str, list[float]] = {side: [] for side in children}
    for _ in range(repeats):
        for side, proc in children.items():
            result = proc.request("step", "step")
            if not np.isfinite(result["loss"]):
                raise FloatingPointError(f"{side} step gave a non-finite loss {result['loss']}")
            times[side].append(result["seconds"])
    return times


def report_rows(ready: dict[str, dict], done: dict[str, dict], times: dict[str, list[float]], setup: dict[str, Any],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per side."""
    rows = []
    tokens = args.batch_size * setup["sequence_length"]
    for side in SIDES:
        median = statistics.median(times[side])
        device_memory = done[side]["device_memory"]
        peak = device_memory.get("device_peak_mib", done[side]["rss"]["step_peak_mib"])
        achieved = setup["flops"]["step"] / median
        peak_device = peak_flops(ready[side]["device"], args.dtype)
        row = {
            "side": side,
            "implementation": IMPLEMENTATIONS[side],
            "mode": "sparselora",
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "sequence_length": setup["sequence_length"],
            **{k: v for k, v in ready[side].items() if k != "first_loss"},
            "first_loss": ready[side]["first_loss"],
            "step_ms_median": round(1000 * median, 2),
            "step_ms_min": round(1000 * min(times[side]), 2),
            "step_ms_max": round(1000 * max(times[side]), 2),
            "tokens_per_s": round(tokens / median, 1),
            "model_tflops_per_s": round(achieved / 1e12, 4),
            "mfu": None if peak_device is None else round(achieved / peak_device, 4),
            "peak_mib": peak,
            "peak_memory_kind": "device" if "device_peak_mib" in device_memory else "rss",
            "rss": done[side]["rss"],
            "device_memory": device_memory or None,
        }
        rows.append(row)
    peer = rows[SIDES.index("peer")]
    for row in rows:
        row["vs_peer"] = round(row["step_ms_median"] / peer["step_ms_median"], 3)
        row["peak_vs_peer"] = round(row["peak_mib"] / peer["peak_mib"], 3) if peer["peak_mib"] > 0 else None
    return rows


def print_table(rows: Sequence[dict[str, Any]], report: dict[str, Any]) -> None:
    """One line per side, then the loss agreement."""
    first = rows[0]
    peak = "device allocator" if first["peak_memory_kind"] == "device" else "peak RSS over RSS after imports"
    print(f"config {report['config'] or report['dir']}: {report['params']:,} params, {report['dtype']}, "
          f"batch {first['batch_size']} × {first['sequence_length']} tokens ({report['image_tokens']} image), "
          f"{report['lora_modules']} LoRA modules, {report['masked_weights']} masked kernels at "
          f"{report['sparsity']:.0%} {report['pattern']}; peak = {peak}")
    print(f"{'side':<18}{'step ms':>10}{'min':>9}{'max':>9}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}"
          f"{'x peer':>8}{'mem x peer':>12}{'first loss':>12}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "-" if r["peak_vs_peer"] is None else f"{r['peak_vs_peer']:.2f}"
        print(f"{r['side'] + ' sparselora':<18}{r['step_ms_median']:>10}{r['step_ms_min']:>9}{r['step_ms_max']:>9}"
              f"{r['tokens_per_s']:>10}{r['model_tflops_per_s']:>9.3f}{mfu:>7}{r['peak_mib']:>10}{r['vs_peer']:>8.2f}"
              f"{mem:>12}{r['first_loss']:>12.6f}")
    print(f"first-step loss: ours {report['loss_ours']:.7f}, peer {report['loss_peer']:.7f}, "
          f"|diff| {report['loss_abs_diff']:.2e} ({report['loss_rel_diff']:.2e} relative)")
    print(f"gradients at a shared LoRA state (B ≠ 0), {report['grad_factors']} factors: largest relative difference "
          f"{report['grad_rel_diff']:.2e} ({report['grad_worst_factor']})")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments; as the parent, prepare both sides, time them and report."""
    from common import positive_int  # (imports no JAX: the peer's process runs this too)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"a size preset of benchmarks/llava.py (quick, small, 1b) or a JSON file "
                                         f"with the same keys (default {FULL['config']})")
    parser.add_argument("--dir", help="where to build the checkpoint; one already there (config.json present) is "
                                      "used as it is (default: a temporary directory)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="weights and compute on both sides (default: bfloat16 on a GPU, else float32)")
    parser.add_argument("--batch-size", type=positive_int, help=f"default {FULL['batch_size']}")
    parser.add_argument("--text-tokens", type=positive_int,
                        help=f"tokens per row besides the image placeholders (BOS included; the last quarter is the "
                             f"answer); default {FULL['text_tokens']}")
    parser.add_argument("--repeats", type=positive_int, help=f"timed steps per side (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=positive_int,
                        help=f"untimed steps per side first; the first one's loss is the check (default "
                             f"{FULL['warmup']})")
    parser.add_argument("--pattern", default="unstructured", help="mask pattern: unstructured or N:M (e.g. 2:4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, both sides (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-layers", action="store_true", help="ours: each tower's blocks as one scanned layer")
    parser.add_argument("--remat", default="none", choices=REMAT_MODES, help="ours: block rematerialisation")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", default="results/peer_train_step.json")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.work))
        return

    import jax
    import torch

    from sparsevlm.config import SparsitySpec

    from common import write_results
    from llava import build_checkpoint, sizes

    load_before = os.getloadavg()
    defaults = QUICK if args.quick else FULL
    for name in ("config", "batch_size", "text_tokens", "repeats", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    size = sizes(args.config)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu != torch.cuda.is_available():
        raise SystemExit(f"JAX runs on {jax.default_backend()} but PyTorch {'does' if on_gpu else 'does not'} see "
                         "no CUDA device: both sides must run on the same device")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.text_tokens < 4:
        raise SystemExit(f"--text-tokens {args.text_tokens}: needs at least 4 (BOS, prompt and answer)")
    try:
        SparsitySpec.same(SPARSITY, args.pattern)
    except ValueError as err:
        raise SystemExit(f"--pattern {args.pattern!r}: {err}") from None

    with tempfile.TemporaryDirectory(prefix="peer_train_step_") as tmp:
        work = Path(tmp)
        # Both sides start importing their libraries now, while the checkpoint and masks are made.
        children = {side: Child(side, work) for side in SIDES}
        try:
            directory = Path(args.dir) if args.dir else work / "llava"
            built = not (directory / "config.json").is_file()
            if built:
                build_checkpoint(directory, size, args.seed)
            setup = prepare(directory, work, args)
            gc.collect()
            for proc in children.values():  # set up side by side: neither is timed yet
                proc.send("setup")
            ready = {side: proc.read("ready") for side, proc in children.items()}
            loss_ours, loss_peer = ready["ours"]["first_loss"], ready["peer"]["first_loss"]
            rel_diff = abs(loss_ours - loss_peer) / abs(loss_peer)
            if args.dtype == "float32" and rel_diff > LOSS_TOLERANCE:
                raise SystemExit(f"first-step losses disagree: ours {loss_ours}, peer {loss_peer} ({rel_diff:.2e} "
                                 f"relative > {LOSS_TOLERANCE}): the two sides are not doing the same job")
            times = time_round_robin(children, args.repeats)
            at_state = {side: proc.request("gradients", "gradients") for side, proc in children.items()}
            gradients = compare_gradients(work, at_state, args.dtype)
            done = {side: proc.request("finish", "done") for side, proc in children.items()}
        finally:
            for proc in children.values():
                proc.close()

    rows = report_rows(ready, done, times, setup, args)
    ours, peer = rows[SIDES.index("ours")], rows[SIDES.index("peer")]
    report = {
        "benchmark": "peer_train_step",
        "config": args.config if built else None,
        "sizes": size if built else None,
        "built": built,
        "dir": args.dir,
        "quick": args.quick,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lr": args.lr,
        "kl_weight": setup["kl_weight"],
        "temperature": setup["temperature"],
        "scan_layers": args.scan_layers,
        "remat": args.remat,
        "ranks": setup["ranks"],
        "alpha": setup["alpha"],
        "sparsity": SPARSITY,
        "pattern": args.pattern,
        "params": setup["params"],
        "image_tokens": setup["image_tokens"],
        "answer_tokens": setup["answer_tokens"],
        "lora_modules": setup["lora_modules"],
        "masked_weights": setup["masked_weights"],
        "kept_fraction": setup["kept_fraction"],
        "model_flops_per_step": setup["flops"],
        "loss_ours": loss_ours,
        "loss_peer": loss_peer,
        "loss_abs_diff": abs(loss_ours - loss_peer),
        "loss_rel_diff": rel_diff,
        **gradients,
        "results": rows,
        # Ours over the peer's, from the figures in `results` (unrounded, so they can be checked against them).
        "ratios": {"step_time": ours["step_ms_median"] / peer["step_ms_median"],
                   "peak_memory": ours["peak_mib"] / peer["peak_mib"] if peer["peak_mib"] > 0 else None},
    }
    if ours["trainable_params"] != peer["trainable_params"]:
        raise RuntimeError(f"trainable LoRA params differ: ours {ours['trainable_params']}, "
                           f"peer {peer['trainable_params']}")
    print_table(rows, report)
    write_results(args.json, report, load_before[0])


if __name__ == "__main__":
    main()
