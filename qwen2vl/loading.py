"""`from_pretrained` / `save_pretrained` for the model classes: argument handling (dtype, device_map,
attention backend, quantization, tensor parallel) around the checkpoint reader/writer in `checkpoint.py`."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoint_quant  # registers the hub int4 formats (awq, gptq) in quantization.serialization.LOADERS
from .checkpoint import load_checkpoint_into, save_checkpoint
from .configuration import Qwen2VLConfig
from .generation.config import GenerationConfig
from .lora import load_adapter
from .model.attention import check_backend
from .model_files import DEMO_MODEL_NAME, demo_model_path, resolve_model_dir, resolve_name  # noqa: F401 (public)
from .parallel.tp import load_tensor_parallel
from .quantization import quantize_model
from .quantization.awq import calibration_ids
from .quantization.serialization import config_for_save, prepare_quantized

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        name = getattr(config, "dtype", None) if dtype == "auto" or dtype is None else None
        return _DTYPES.get(str(name), torch.float32) if name else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"Unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")


def resolve_device(device_map) -> torch.device:
    if device_map is None or device_map == "cpu":
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("device_map with several devices is not supported; use tensor parallelism (tp_plan).")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    device = torch.device(device_map)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for CUDA but no CUDA device is available.")
    return device


QUANTIZATION_OPTIONS = ("embedding", "vision", "include_lm_head", "group_size", "int4_method")


def quantization_request(quantization) -> tuple[str, dict]:
    """`quantization=` as (method, quantize_model options): "int8" / "int4", or a dict such as
    {"method": "int4", "embedding": "int8", "vision": "int4"} (keys: "method" and QUANTIZATION_OPTIONS)."""
    if isinstance(quantization, str):
        return quantization, {}
    if not isinstance(quantization, dict) or "method" not in quantization:
        raise ValueError(f"quantization must be 'int8', 'int4' or a dict with a 'method' key, got {quantization!r}")
    options = dict(quantization)
    method = options.pop("method")
    unknown = sorted(set(options) - set(QUANTIZATION_OPTIONS))
    if unknown:
        raise ValueError(f"quantization options {unknown} are unknown; known: {', '.join(QUANTIZATION_OPTIONS)}")
    return method, options


def from_pretrained(cls, pretrained_model_name_or_path, *, config=None, dtype=None, torch_dtype=None,
                    device_map=None, attn_implementation=None, revision=None, quantization=None, tp_plan=None,
                    tp_size=None, progress=True, adapter=None, output_loading_info=False, **kwargs):
    """Build `cls` on the meta device and load the checkpoint into it. A base-model checkpoint (Qwen2VLModel
    saved alone) loads into the conditional-generation class with a freshly initialized LM head (logged), as
    the reference does. `adapter`: a PEFT LoRA adapter folder applied on top (see `qwen2vl.lora`)."""
    unknown = set(kwargs) - {"trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "cache_dir",
                             "local_files_only", "token", "force_download", "subfolder"}
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments: {sorted(unknown)}")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError("Pass either dtype or torch_dtype, not both.")
    dtype = dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto")
    model_dir = resolve_model_dir(resolve_name(pretrained_model_name_or_path), revision=revision)
    config_class = getattr(cls, "config_class", None) or Qwen2VLConfig
    if config is None:
        config = config_class.from_pretrained(model_dir)
    if attn_implementation is not None:
        config.attn_implementation = attn_implementation
    impl = getattr(config, "attn_implementation", None) or "sdpa"
    torch_dt = resolve_dtype(dtype, config)
    device = resolve_device(device_map)
    qcfg = getattr(config, "quantization_config", None)  # a quantized checkpoint (ours, AWQ, GPTQ)
    if dtype == "auto" and torch_dt == torch.float16 and device.type == "cpu" and qcfg is not None:
        # The hub's AWQ / GPTQ repos say float16; on a CPU the int4 kernels take bf16 activations and float16
        # matmuls are slow, so "auto" means bfloat16 there (same exponent range as the float32 the scales need).
        logger.info("%s: float16 quantized checkpoint on the CPU: running in bfloat16 (pass dtype='float16' to "
                    "keep float16)", model_dir)
        torch_dt = torch.bfloat16
    check_backend(impl, device if impl == "flash_attention_2" else None,
                  torch_dt if impl == "flash_attention_2" else None)

    if tp_plan is not None or tp_size is not None:
        if quantization is not None or qcfg is not None:
            raise ValueError("quantization is not supported together with tensor parallelism (tp_plan).")
        if device_map not in (None, "auto"):
            raise ValueError("device_map cannot be combined with tp_plan: each rank uses its own device "
                             "(cuda:LOCAL_RANK with NCCL, the CPU with gloo).")

        if adapter is not None:
            raise ValueError("adapter= is not supported with tensor parallelism; merge the adapter first "
                             "(qwen2vl.lora.load_adapter + save_pretrained) and load the merged model.")
        model = load_tensor_parallel(cls, config, model_dir, torch_dt, tp_plan=tp_plan, tp_size=tp_size,
                                     progress=progress)
        model.generation_config = GenerationConfig.from_model_dir(model_dir, config)
        return model

    with torch.device("meta"):
        model = cls(config)
    if qcfg is not None:  # a quantized checkpoint: its layers are built quantized, then read as stored
        if quantization is not None or adapter is not None:
            raise ValueError(f"{model_dir} holds a quantized checkpoint ({qcfg.get('quant_method')!r}); "
                             "quantization= and adapter= need a full-precision one.")
        prepare_quantized(model, qcfg, model_dir, torch_dt)
    # A base model's checkpoint has no LM head: the reference then starts one from its init.
    head_optional = hasattr(model, "lm_head") and not getattr(config, "tie_word_embeddings", False)
    info = load_checkpoint_into(model, model_dir, dtype=torch_dt, device=device, progress=progress,
                                optional=("lm_head.weight",) if head_optional else ())
    if qcfg is not None:  # AWQ / GPTQ layers were read packed as stored: unpacked into int4 layers now
        checkpoint_quant.finish_quantized(model, torch_dt)
    if info.missing_keys:
        logger.warning("%s: %s not in the checkpoint at %s; newly initialized (train it before use).",
                       cls.__name__, ", ".join(info.missing_keys), model_dir)
    model.eval()
    if model.can_generate() if hasattr(model, "can_generate") else True:
        model.generation_config = GenerationConfig.from_model_dir(model_dir, config)
    if adapter is not None:  # merged before any quantization, so int8 weights include it
        model = load_adapter(model, adapter)
    if quantization is not None:
        method, options = quantization_request(quantization)
        cal = calibration_ids(model_dir, config.get_text_config().vocab_size) if method == "int4" else None
        quantize_model(model, method, calibration=cal, **options)
    model.name_or_path = str(pretrained_model_name_or_path)
    if output_loading_info:
        return model, {"missing_keys": set(info.missing_keys), "unexpected_keys": set(info.unexpected_keys),
                       "mismatched_keys": set(), "error_msgs": []}
    return model


def save_pretrained(model, save_directory, max_shard_size="5GB", **kwargs) -> None:
    unknown = set(kwargs) - {"safe_serialization", "is_main_process"}
    if unknown:
        raise TypeError(f"save_pretrained got unexpected arguments: {sorted(unknown)}")
    if not kwargs.get("is_main_process", True):
        return
    qcfg = config_for_save(model)  # ValueError for what cannot be saved (int8)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if qcfg is not None:
        cfg.quantization_config = qcfg
        if "quantization_config" not in cfg._extra_keys:
            cfg._extra_keys.append("quantization_config")
    elif "quantization_config" in cfg._extra_keys:  # a dequantized / unquantized model: no stale entry
        cfg._extra_keys.remove("quantization_config")
    for name, value in (("dtype", str(model.dtype).replace("torch.", "")), ("architectures", [type(model).__name__])):
        setattr(cfg, name, value)
        if name not in cfg._defaults and name not in cfg._extra_keys:  # text / vision configs: written too
            cfg._extra_keys.append(name)
    cfg.save_pretrained(save_directory)
    save_checkpoint(model, save_directory, max_shard_size=max_shard_size)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)
