"""Engine configuration: frozen dataclasses, validated at construction with errors that name the values."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from loraplex.engine.speculative import check_method
from loraplex.model import gemm
from loraplex.model.attention import ATTENTION_BACKENDS, resolve_attention_backend
from loraplex.model.quant import QUANTIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ASYNC_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "demo"
    """`demo`, a Hugging Face checkpoint folder, or a `.gguf` file."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the model's max_position_embeddings."""
    linear_backend: str = "auto"
    """How the linear layers multiply (`auto`: `onednn` for float32 on the CPU where torch has oneDNN, else
    `aten`; `onednn`: weights prepacked once for oneDNN, faster at decode batch sizes, a tied LM head then
    takes vocab × hidden × 4 bytes more memory; `aten`: torch's matmul). See loraplex/model/gemm.py."""

    attention_backend: str = "auto"
    """Paged attention (`auto`: `triton` on CUDA where triton imports, else `torch`; `triton`: the paged
    Triton kernels, CUDA only (CPU under TRITON_INTERPRET=1); `torch`: a gather of the cached blocks, then
    SDPA). See loraplex/model/attention.py."""
    quantize: str = "none"
    """Quantize the base model's linear layers at load: `none`; `int8` (on the CPU, float32: int8 weights per
    channel, int8 activations per token, SmoothQuant calibrated at load; on a GPU: int8 weights per channel,
    weight-only); `int4` (any device: 4-bit weights in groups
    of 32 inputs, decoded for each product; the LM head stays in float); `fp8` (CUDA, compute capability
    8.9+: fp8 e4m3 weights and activations); loraplex/model/quant.py. Adapters apply on top unchanged."""
    enforce_eager: bool = False
    """Run every step op by op. Otherwise, on CUDA with the triton attention, decode steps replay CUDA
    graphs captured at startup (loraplex/model/cuda_graphs.py); prefill and mixed steps always run eager."""
    cuda_graph_max_batch: int | None = None
    """Largest decode batch captured as a CUDA graph (larger ones run eager); None = max_num_seqs."""
    cuda_graph_capture_s: float = 120.0
    """Time allowed for capturing the CUDA graphs at startup; sizes left when it is spent run in the next
    larger captured graph, padded."""

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.cuda_graph_max_batch is not None and self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")
        if not self.cuda_graph_capture_s > 0:
            raise ValueError(f"cuda_graph_capture_s must be > 0, got {self.cuda_graph_capture_s}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.linear_backend not in gemm.BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(gemm.BACKENDS)}, got {self.linear_backend!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def resolved_attention_backend(self) -> str:
        """`attention_backend` with `auto` decided for this device (ValueError if it cannot run)."""
        return resolve_attention_backend(self.attention_backend, self.torch_device())

    def resolved_quantize(self) -> str:
        """`quantize`, checked against this device and dtype (ValueError if it cannot run there)."""
        device = self.torch_device()
        if self.quantize == "int8" and device.type == "cpu" and self.torch_dtype() != torch.float32:
            raise ValueError(f"quantize 'int8' on the CPU runs in float32 (this model: {self.torch_dtype()})")
        if self.quantize == "fp8":
            if device.type != "cuda":
                raise ValueError(f"quantize 'fp8' runs on CUDA GPUs with fp8 tensor cores (this model is on {device}: "
                                 "its fp8 matmul would be ~17x slower than float32 there); on the CPU use 'int8'")
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                raise ValueError(f"quantize 'fp8' needs compute capability 8.9 or newer (L4, L40S, H100, H200); "
                                 f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
        return self.quantize

    def resolved_linear_backend(self) -> str:
        """`linear_backend` with `auto` decided for this device and dtype (ValueError if it cannot run)."""
        return gemm.resolve(self.linear_backend, self.torch_device(), self.torch_dtype())


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int | None = None
    """Memory for the KV block pool (keys and values of every layer); None: on CUDA what gpu_memory_utilization
    leaves after the weights, adapter slots and a forward's peak (loraplex/engine/memory.py), else 1 GiB."""
    gpu_memory_utilization: float = 0.9
    """Share of the CUDA device's memory loraplex may fill (weights, adapter slots, activations, KV cache)."""
    num_blocks: int | None = None
    """Exact pool size in blocks; overrides kv_cache_bytes (tests use it to force preemption)."""
    enable_prefix_caching: bool = True
    """Share the KV of identical prompt prefixes (full blocks, same adapter) between requests."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks and decodes together); long prompts are chunked."""
    max_batch_prefill_tokens: int | None = None
    """Prefill (prompt and recompute) tokens per step; None = max_num_batched_tokens."""
    max_batch_total_tokens: int | None = None
    """Most tokens (prompt + generated so far) running requests hold in the KV cache together; None = the KV pool."""
    max_input_length: int | None = None
    """Longest prompt accepted, in tokens (after truncation); None = the model's limit."""
    max_total_tokens: int | None = None
    """Longest prompt + max_new_tokens accepted for one request; None = the model's and the KV cache's limits."""
    max_active_adapters: int | None = None
    """Most distinct adapters with running requests at once; None = every device slot (capped at max_loras)."""
    adapter_cycle_steps: int = 16
    """While adapters wait for a device slot, a slot holder admits no new requests after this many steps,
    and one with no more work left than the next waiting adapter is parked (its requests keep their KV and
    skip steps) to pass its slot on (loraplex/engine/scheduler.py)."""
    adapter_cycle_time_s: float = 2.0
    """The same slot rotation after this many seconds holding the slot, whichever comes first (seconds count
    once the holder has had half of `adapter_cycle_steps`, so slow steps do not rotate slots every step)."""
    async_output: str = "auto"
    """Make a step's outputs (text, stop strings) while the next step's forward runs: `on`, `off`, or `auto`
    (on for CUDA, whose kernels run while the host works; off on a CPU, where it needs a thread beside the
    forward's and measured no faster on 2 cores: docs/benchmarks.md). Outputs then come one step later."""
    async_scheduling: str = "auto"
    """Queue each decode step's forward before the last step's tokens are read back: the step's inputs take
    those tokens where they were sampled, on the device, and the host reads a step's tokens (and makes their
    outputs) while the next one runs. `on`, `off`, or `auto` (on for CUDA, off on a CPU, whose kernels run
    as the host calls them: docs/benchmarks.md). Outputs come one step later; a request that ended at a
    token has then run one step more, whose token is dropped. Steps while a request wants its prompt's
    logprobs wait for the last step's tokens (penalties, the watermark, grammars and token logprobs do not:
    a step's sampling is queued after the last tokens are read); speculative decoding turns it off."""
    speculative_tokens: int = 0
    """Speculative decoding: draft tokens a decoding request may propose per step, verified in that step
    (0: off). Output is token for token what decoding without it gives (loraplex/engine/speculative.py)."""
    speculative_method: str = "ngram"
    """How drafts are proposed: `ngram` (prompt lookup: the tokens that followed the latest earlier
    occurrence of the output's last n-gram in the prompt or output), or `medusa` (Medusa heads: a request's
    adapter's own, else `speculative_medusa_heads`)."""
    speculative_medusa_heads: str | None = None
    """`medusa`: a folder of Medusa heads (config.json + medusa_lm_head.safetensors) drafting for every request
    whose adapter carries no heads of its own; None: only requests on adapters with heads speculate."""
    speculative_medusa_lookup: bool = True
    """`medusa`: where a request's own prompt and output have an n-gram match, draft by that prompt lookup
    first (heads see no prompt, so they cannot copy from it), by the heads elsewhere."""
    speculative_ngram_max: int = 3
    """Longest n-gram looked up (tried first)."""
    speculative_ngram_min: int = 1
    """Shortest n-gram looked up."""
    speculative_history_tokens: int = 4096
    """`ngram` drafts also come from the latest outputs of the same adapter, this many tokens per adapter
    (0: from the request's own prompt and output only). They change no output, only its speed."""
    speculative_max_batch: int = 8
    """Speculate only in steps with at most this many running requests: a large batch is compute-bound,
    where verifying drafts costs more than the steps it saves."""

    def __post_init__(self) -> None:
        for name in ("speculative_tokens", "speculative_max_batch", "speculative_history_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_method(self.speculative_method)
        if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ValueError("need 1 <= speculative_ngram_min <= speculative_ngram_max, got "
                             f"{self.speculative_ngram_min} and {self.speculative_ngram_max}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens",
                     "max_input_length", "max_total_tokens", "max_active_adapters", "adapter_cycle_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("async_output", "async_scheduling"):
            if getattr(self, name) not in ASYNC_MODES:
                raise ValueError(f"{name} must be one of {', '.join(ASYNC_MODES)}, got {getattr(self, name)!r}")
        if self.async_scheduling == "on" and self.speculative_tokens > 0:
            raise ValueError("async_scheduling on does not go with speculative decoding (speculative_tokens > 0): "
                             "drafts are proposed from the tokens the host has read")
        if not self.adapter_cycle_time_s > 0:
            raise ValueError(f"adapter_cycle_time_s must be > 0, got {self.adapter_cycle_time_s}")
        if (self.max_input_length is not None and self.max_total_tokens is not None
                and self.max_input_length >= self.max_total_tokens):
            raise ValueError(f"max_input_length ({self.max_input_length}) must be < max_total_tokens "
                             f"({self.max_total_tokens}) to leave room for one new token")
        if (self.max_total_tokens is not None and self.max_batch_total_tokens is not None
                and self.max_total_tokens > self.max_batch_total_tokens):
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) must be <= max_batch_total_tokens "
                             f"({self.max_batch_total_tokens}): a request that long could never run")

    def resolved_async_output(self, device: torch.device) -> bool:
        """`async_output` decided for `device`."""
        return device.type == "cuda" if self.async_output == "auto" else self.async_output == "on"

    def resolved_async_scheduling(self, device: torch.device) -> bool:
        """`async_scheduling` decided for `device` (never with speculative decoding)."""
        if self.async_scheduling == "auto":
            return device.type == "cuda" and self.speculative_tokens == 0
        return self.async_scheduling == "on"

    @property
    def prefill_token_budget(self) -> int:
        return min(self.max_batch_prefill_tokens or self.max_num_batched_tokens, self.max_num_batched_tokens)


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 4
    """Device slots: distinct adapters that can run in one step. 0 serves the base model only."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted; slot buffers are sized for it."""
    lora_backend: str = "auto"
    """LoRA op backend (`auto`: on CUDA `triton` where triton imports, else `native` where it builds, else
    `torch`; `native`: a C kernel compiled on
    first use for this CPU, float32 CPU tensors, needs a C compiler; `torch`: the pure-torch path;
    `reference`: the per-token loop; `triton`: the GPU kernels, CUDA tensors only, needs triton)."""
    lora_dtype: str = "auto"
    """dtype of the adapters' weights in the host tier and the device slots (`auto`: the model's; `float32`,
    `bfloat16`, `float16`). The products and sums keep the model's dtype. `bfloat16` on a float32 model halves
    the adapters' memory and what the CPU LoRA kernel reads (1.4-1.7x faster alone at ranks 64-192; in the
    8-adapter decode step its share of the step fell by 15-30 %, docs/benchmarks.md). `float16` on a CPU runs
    the slower torch path."""

    def __post_init__(self) -> None:
        if self.lora_dtype != "auto" and self.lora_dtype not in DTYPES:
            raise ValueError(f"lora_dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.lora_dtype!r}")
        if self.max_loras < 0:
            raise ValueError(f"max_loras must be >= 0, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in [1, 512], got {self.max_lora_rank}")
        from loraplex.lora.ops import get_lora_op  # imported here: config must stay cheap to import

        get_lora_op(self.lora_backend)  # raises ValueError naming an unknown backend

    def resolved_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """`lora_dtype` with `auto` decided for a model of `model_dtype`."""
        return model_dtype if self.lora_dtype == "auto" else DTYPES[self.lora_dtype]


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "127.0.0.1"
    """Interface to listen on (`0.0.0.0` for every interface, e.g. in a container)."""
    port: int = 3000
    """TCP port of the HTTP API."""
    max_concurrent_requests: int = 128
    """Requests in flight at once; beyond it a request is refused at once with 429 (never queued)."""
    max_best_of: int = 4
    """Largest `best_of` a request may ask for."""
    adapter_source: str = "local"
    """Source of an `adapter_id` when a request names none (`local`, `hub` or `s3`); always allowed."""
    allow_request_sources: tuple[str, ...] = ("local",)
    """Sources a request may name besides adapter_source (`adapter_source` field, `s3://` ids), e.g.
    `local,hub,s3`. Default `local`: fetching from the hub or S3 spends the server's credentials,
    network and disk on whatever an anonymous client names, so the operator opts in."""
    preloaded_adapter_ids: tuple[str, ...] = ()
    """Adapters loaded at startup (comma-separated); others still load on demand."""
    admin_token: str | None = None
    """Bearer token required by the adapter admin API (`/v1/adapters`); unset: the admin API is open."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM: stop admitting, let in-flight requests finish for at most this long, then exit."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "preloaded_adapter_ids", tuple(self.preloaded_adapter_ids))
        object.__setattr__(self, "allow_request_sources", tuple(self.allow_request_sources))
        bad = [s for s in (self.adapter_source, *self.allow_request_sources) if not s.isidentifier()]
        if bad:
            raise ValueError(f"adapter_source and allow_request_sources must name adapter sources, got {bad}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_best_of < 1:
            raise ValueError(f"max_best_of must be >= 1, got {self.max_best_of}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.admin_token is not None and not self.admin_token:
            raise ValueError("admin_token must not be empty (leave it unset for an open admin API)")


@dataclass(frozen=True)
class AdapterSourceConfig:
    sources: tuple[str, ...] = ("local", "hub", "s3")
    """Adapter sources a request may name (registry names, see loraplex.adapters.sources)."""
    adapter_roots: tuple[str, ...] | None = None
    """Folders that local adapter ids must lie inside; None accepts any folder (offline use, not a server)."""
    hub_token: str | None = field(default=None, repr=False)
    """Server-wide Hugging Face token for requests that bring none; None: HF_TOKEN or the token saved in HF_HOME."""
    hub_endpoint: str | None = None
    """Hub URL; None: HF_ENDPOINT as huggingface_hub read it at import (huggingface.co by default)."""
    hub_cache_dir: str | None = None
    """huggingface_hub cache read in offline mode; None: HF_HUB_CACHE / HF_HOME/hub."""
    hub_offline: bool | None = None
    """Serve hub adapters only from hub_cache_dir, never the network; None: HF_HUB_OFFLINE."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, R2, ...); None: AWS_ENDPOINT_URL when set, else AWS itself."""
    disk_cache_dir: str | None = None
    """Disk tier for fetched adapters; None: loraplex_home()/adapters."""
    disk_cache_bytes: int = 20 << 30
    """Disk tier size; least recently used adapters are removed beyond it."""
    host_cache_bytes: int = 4 << 30
    """Parsed adapters kept in host memory (LRU by bytes of their float32 tensors)."""
    loader_workers: int = 2
    """Threads that fetch and parse adapters, so the engine step loop never waits on I/O."""
    negative_ttl_s: float = 5.0
    """How long a failed load is answered from memory instead of asking the source again."""
    revalidate_s: float = 30.0
    """How long a remote ref's resolved version (hub branch, S3 ETags) is trusted before asking again."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("sources must name at least one adapter source, got ()")
        if self.adapter_roots is not None:
            object.__setattr__(self, "adapter_roots", tuple(self.adapter_roots))
            if not all(self.adapter_roots):
                raise ValueError(f"adapter_roots must be non-empty paths, got {self.adapter_roots!r}")
        if self.hub_token is not None and not self.hub_token:
            raise ValueError("hub_token must not be empty (leave it unset to use HF_TOKEN)")
        for name in ("disk_cache_bytes", "host_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loader_workers < 1:
            raise ValueError(f"loader_workers must be >= 1, got {self.loader_workers}")
        for name in ("negative_ttl_s", "revalidate_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapters: AdapterSourceConfig = field(default_factory=AdapterSourceConfig)

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from flat keyword options, each the name of a field of one of the parts."""
        parts = {f.name: f.default_factory() for f in fields(cls)}  # type: ignore[misc,operator]
        groups: dict[str, dict[str, Any]] = {name: {} for name in parts}
        for key, value in options.items():
            owner = next((name for name, part in parts.items() if key in {f.name for f in fields(part)}), None)
            if owner is None:
                raise TypeError(f"unknown option {key!r}")
            groups[owner][key] = value
        return cls(**{name: type(part)(**groups[name]) for name, part in parts.items()})
