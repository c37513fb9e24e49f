"""The validated configuration objects that every entry point produces.

`EmbedderConfig` says which model to load and how an item becomes a vector. The CLI, the backfill job, the
Serve app and the cluster manifests all build one of these (from flags, YAML or a Serve config), so the
same options mean the same thing everywhere. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.recipes import (
    DEFAULT_RERANK_INSTRUCTION,
    OFFICIAL_MAX_PIXELS,
    OFFICIAL_MIN_PIXELS,
    RECIPES,
    PaddingSide,
    Pooling,
    RecipeName,
    normalize_instruction,
    recipe_for_model,
)

DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "4bit", "8bit", "fp8"]
# What quantization='fp8' leaves in bf16 (nn.Linear): the layers and projections most sensitive to precision
Fp8Keep = Literal["first", "last", "down_proj"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
AttentionLayout = Literal["padded", "packed"]
AttentionLayoutChoice = Literal["auto", "padded", "packed"]
Engine = Literal["hooks", "legacy"]
VarlenKernel = Literal["flash", "flex", "sdpa"]  # what `auto` resolves to (pipelines.varlen)
VarlenAttention = Literal["auto", VarlenKernel]
Backend = Literal["transformers", "sentence-transformers", "stand-in"]

TINY_MODEL = "tiny"
DEFAULT_TABLE_NAME = "vectors"  # the vectors table, when a config or a command names none
# The built-in offline checkpoints (`pipelines.tiny_model`), by name: `tiny` stands for an Instruct checkpoint,
# `tiny-embedding` for a Qwen3-VL-Embedding one (its tokenizer appends <|endoftext|>), `tiny-reranker` for a
# Qwen3-VL-Reranker one.
TINY_RERANKER = "tiny-reranker"
TINY_MODELS = {TINY_MODEL: "instruct", "tiny-embedding": "embedding", TINY_RERANKER: "reranker"}


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys and can be read from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ModelOptions(StrictModel):
    """Which checkpoint to load and how to run it: the options the embedder and the reranker share."""

    model: str = Field(
        default=TINY_MODEL,
        description="A hub id (e.g. Qwen/Qwen3-VL-2B-Instruct), a local checkpoint directory, or 'tiny' for the "
        "built-in offline random checkpoint (built on first use).",
    )
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    attn_implementation: AttnImplementation = Field(default="sdpa", description="Attention kernel.")
    quantization: Quantization = Field(
        default="none",
        description="bitsandbytes 4-bit or 8-bit weights; fp8: float8 weights and activations in the decoder "
        "layers' matmuls (torch._scaled_mm; Ada/Hopper GPUs; converts the given model's layers in place).",
    )
    fp8_keep: tuple[Fp8Keep, ...] = Field(
        default=(),
        description="With quantization='fp8', what stays in bf16: first (the first decoder layer), last (the "
        "last one), down_proj (every layer's MLP output projection). The rest runs in FP8, q/k/v and gate/up "
        "each as one fused matmul whose input is quantized once. Vectors move with it (benchmarks/NOTES.md, "
        "FP8 that keeps the vectors).",
    )
    min_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Smaller images are upscaled to at least this many pixels; default: the official 4*32*32 "
        "(qwen3-vl-embedding, the reranker), 64*64 (instruct-mean).",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Larger images are downscaled to at most this many pixels; default: the official "
        "1800*32*32 (qwen3-vl-embedding, the reranker), 1280*32*32 (instruct-mean).",
    )
    max_image_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="Images whose decoded size exceeds this are rejected before decoding (decompression bombs).",
    )
    max_length: int = Field(
        default=8192, ge=8, description="Longest token sequence; longer texts are truncated."
    )
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="Token budget of one forward pass (padded tokens count)."
    )
    max_batch_items: int = Field(default=256, ge=1, description="Most items in one forward pass.")
    attention_layout: AttentionLayoutChoice = Field(
        default="auto",
        description="padded: items of a batch padded to the longest, the model's own attention. packed: items "
        "laid end to end in one row with variable-length attention (no padding; the fast path on GPUs). "
        "Both compute the same vectors. auto: packed on CUDA, padded elsewhere (on a CPU packed attends item "
        "by item and is slower).",
    )
    engine: Engine = Field(
        default="hooks",
        description="The packed layout's engine. hooks: the model's own decoder layers and vision blocks with "
        "the varlen kernel registered through transformers' AttentionInterface. legacy: the previous engine, "
        "which re-composes the layers from their parts; kept one option away until hooks is measured on a GPU "
        "against the README's figures (benchmarks/NOTES.md).",
    )
    varlen_attention: VarlenAttention = Field(
        default="auto",
        description="Attention kernel of the packed layout: flash (CUDA, bf16/fp16), flex (FlexAttention), "
        "sdpa (one call per item, anywhere); auto: flash where it checks out, else sdpa.",
    )
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="torch.compile the decoder layers and vision blocks of the packed layout (compiled once, "
        "reused by every layer; costs seconds at start with a warm compiler cache, see benchmarks/NOTES.md). "
        "auto: on a GPU in the packed layout, compiled at warm_up(), which long-lived users call before taking "
        "work (backfill actors, Serve replicas); one-shot use that never warms up (search, demo) stays eager.",
    )
    cuda_graphs: bool | Literal["auto"] = Field(
        default=False,
        description="CUDA graphs for small text steps of the packed layout (pipelines.step_graphs): captured at "
        "warm_up() for a few bucketed token and item counts, each step padded to its bucket with dummy "
        "segments that pooling drops, then replayed with one launch (Serve's small steps are host-bound). "
        "The same vectors. auto: on CUDA in the packed layout. Off by default until a GPU shows it helps "
        "(benchmarks/NOTES.md).",
    )

    @field_validator("fp8_keep", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """A flag gives one string: `--fp8-keep first,last,down_proj`."""
        return (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )

    @model_validator(mode="after")
    def _check_model_options(self) -> Self:
        if self.compile is True and self.attention_layout != "packed":
            raise ValueError(
                "compile=True needs attention_layout='packed' (compile='auto' compiles where auto picks packed)"
            )
        if self.cuda_graphs is True and self.attention_layout != "packed":
            raise ValueError("cuda_graphs=True needs attention_layout='packed'")
        if self.fp8_keep and self.quantization != "fp8":
            raise ValueError(f"fp8_keep={list(self.fp8_keep)} needs quantization='fp8'")
        if len(set(self.fp8_keep)) != len(self.fp8_keep):
            raise ValueError(f"fp8_keep names a part twice: {list(self.fp8_keep)}")
        if self.resolved_min_pixels > self.resolved_max_pixels:
            raise ValueError(
                f"min_pixels ({self.resolved_min_pixels}) is larger than max_pixels ({self.resolved_max_pixels})"
            )
        return self

    def resolved_attention_layout(self, device_type: str) -> AttentionLayout:
        """`attention_layout` on a device of this type ('cuda', 'cpu', ...): auto is packed on CUDA only."""
        if self.attention_layout != "auto":
            return self.attention_layout
        return "packed" if device_type == "cuda" else "padded"

    def resolved_compile(self, device_type: str, warmed_up: bool) -> bool:
        """Whether the packed layout runs compiled: auto is on once warmed up, in the packed layout on CUDA."""
        if self.compile != "auto":
            return self.compile
        return warmed_up and device_type == "cuda" and self.resolved_attention_layout(device_type) == "packed"

    def resolved_cuda_graphs(self, device_type: str) -> bool:
        """Whether the packed layout captures CUDA graphs at warm-up: auto is on CUDA in the packed layout."""
        if self.cuda_graphs != "auto":
            return self.cuda_graphs
        return device_type == "cuda" and self.resolved_attention_layout(device_type) == "packed"

    @property
    def resolved_min_pixels(self) -> int:
        return self.min_pixels if self.min_pixels is not None else OFFICIAL_MIN_PIXELS

    @property
    def resolved_max_pixels(self) -> int:
        return self.max_pixels if self.max_pixels is not None else OFFICIAL_MAX_PIXELS


class EmbedderConfig(ModelOptions):
    """How to load the model and how an item becomes a vector."""

    backend: Backend = Field(
        default="transformers",
        description="What computes the vectors. transformers: a Qwen3-VL checkpoint through our own engine "
        "(text, images, both); sentence-transformers: a sentence-transformers model (text only); stand-in: "
        "near-free deterministic vectors for measuring the pipeline itself (benchmarks only, refused by Serve).",
    )
    recipe: RecipeName | Literal["auto"] = Field(
        default="auto",
        description="Prompt format and pooling defaults. auto: qwen3-vl-embedding for Qwen3-VL-Embedding "
        "checkpoints (by hub id or directory name, and tiny-embedding), instruct-mean otherwise; the "
        "validated config always holds the recipe it picked.",
    )
    pooling: Pooling | None = Field(default=None, description="Pooling over tokens; default: the recipe's.")
    layer: int | None = Field(
        default=None,
        description="Index into transformers' output_hidden_states tuple (0: token embeddings, -1: last layer "
        "after the final norm); default: the recipe's. The forward pass stops after this layer.",
    )
    normalize: bool = Field(default=True, description="L2-normalise the vectors.")
    dimensions: int | None = Field(
        default=None, ge=1, description="Keep the first D dimensions (Matryoshka), then re-normalise."
    )
    instruction: str | None = Field(
        default=None,
        description="The instruction documents are embedded with (qwen3-vl-embedding only; the backfill, "
        "/v1/embeddings); default: the recipe's. Stripped, and given a '.' unless it ends in punctuation.",
    )
    query_instruction: str | None = Field(
        default=None,
        description="The instruction queries are embedded with (qwen3-vl-embedding only; search, /search, "
        "input_type=query); default: the recipe's ('Retrieve images or text relevant to the user's query.').",
    )
    padding_side: PaddingSide | None = Field(
        default=None, description="Batch padding side; default: the recipe's."
    )
    compile_cache: str | None = Field(
        default=None,
        description="Where compiled graphs are shared between machines: a directory or an object-store URI "
        "(s3://bucket/prefix; credentials and region from the environment, or the URI's query: "
        "?region=...&endpoint_override=host:port&scheme=http). When warm_up() compiles, the artifacts stored "
        "there for this model, device and torch version are loaded first, and saved after if there are none, "
        "so a new GPU node skips Inductor's compilation (pipelines.compile_cache). A store that cannot be read "
        "or written is a warning. The same vectors. Credentials in the URI are refused: the embedder section is "
        "recorded in every table's metadata.",
    )

    @field_validator("compile_cache")
    @classmethod
    def _no_credentials_in_cache_uri(cls, value: str | None) -> str | None:
        from urllib.parse import parse_qs, urlsplit

        if value is None:
            return value
        secret = {"access_key", "secret_key", "session_token"} & set(parse_qs(urlsplit(value).query))
        if secret or urlsplit(value).password:
            raise ValueError(
                "compile_cache must not carry credentials (they would be recorded in the table's metadata): "
                "give them through the environment (AWS_ACCESS_KEY_ID, ...)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe", "auto") in ("auto", None):
            model = str(data.get("model") or TINY_MODEL)
            # sentence-transformers models bring their own modules: the placeholder recipe is never used
            own = data.get("backend") == "sentence-transformers"
            data = {**data, "recipe": "instruct-mean" if own else recipe_for_model(model)}
        return data

    @model_validator(mode="after")
    def _check_sentence_transformers_options(self) -> Self:
        """The sentence-transformers backend tokenizes, pools and normalises with the model's own modules
        (its modules.json), and takes texts only: the Qwen3-VL engine's options mean nothing there and are
        refused rather than silently ignored."""
        if self.backend != "sentence-transformers":
            return self
        if self.model in TINY_MODELS:
            raise ValueError(
                f"backend 'sentence-transformers' needs a sentence-transformers model (a directory with "
                f"modules.json or a hub id), not the built-in Qwen3-VL checkpoint {self.model!r}"
            )
        given = [
            name
            for name in ("pooling", "layer", "padding_side", "instruction", "query_instruction")
            + ("min_pixels", "max_pixels")
            if getattr(self, name) is not None
        ]
        given += ["recipe"] if self.recipe != "instruct-mean" else []
        given += ["quantization"] if self.quantization != "none" else []
        given += ["attention_layout=packed"] if self.attention_layout == "packed" else []
        given += ["compile"] if self.compile is True else []
        if given:
            raise ValueError(
                f"backend 'sentence-transformers' takes no {', '.join(given)}: the model's own modules "
                "(modules.json) decide its tokenization, prompts, pooling and normalisation, and it embeds "
                "texts only; leave them out"
            )
        return self

    @model_validator(mode="after")
    def _check_instructions(self) -> Self:
        for name in ("instruction", "query_instruction"):
            value = getattr(self, name)
            if value is not None and not RECIPES[self.recipe].uses_instruction:
                raise ValueError(f"recipe {self.recipe!r} takes no {name.replace('_', ' ')}")
            if value is not None and not value.strip():
                raise ValueError(f"{name} is blank; leave it out for the recipe's default")
        return self

    @property
    def resolved_pooling(self) -> Pooling:
        return self.pooling or RECIPES[self.recipe].pooling

    @property
    def resolved_layer(self) -> int:
        return self.layer if self.layer is not None else RECIPES[self.recipe].layer

    @property
    def resolved_padding_side(self) -> PaddingSide:
        return self.padding_side or RECIPES[self.recipe].padding_side

    @property
    def resolved_instruction(self) -> str | None:
        """The document instruction as it enters the prompt (normalised like the official code's)."""
        recipe = RECIPES[self.recipe]
        return normalize_instruction(self.instruction or recipe.default_instruction)

    @property
    def resolved_query_instruction(self) -> str | None:
        """The query instruction as it enters the prompt (normalised like the official code's)."""
        recipe = RECIPES[self.recipe]
        return normalize_instruction(self.query_instruction or recipe.default_query_instruction)

    @property
    def resolved_min_pixels(self) -> int:
        return self.min_pixels if self.min_pixels is not None else RECIPES[self.recipe].min_pixels

    @property
    def resolved_max_pixels(self) -> int:
        return self.max_pixels if self.max_pixels is not None else RECIPES[self.recipe].max_pixels

    @property
    def recipe_version(self) -> int:
        return RECIPES[self.recipe].version

    def signature(self) -> dict[str, Any]:
        """What a vector depends on: stored with every table and checked before appending or querying."""
        if self.backend == "sentence-transformers":  # the model's own modules: no recipe, pooling or pixels
            return {
                "backend": self.backend,
                "model": self.model,
                "normalize": self.normalize,
                "dimensions": self.dimensions,
                "max_length": self.max_length,
            }
        return {
            "backend": self.backend,
            "model": self.model,
            "recipe": self.recipe,
            "pooling": self.resolved_pooling,
            "layer": self.resolved_layer,
            "normalize": self.normalize,
            "dimensions": self.dimensions,
            "instruction": self.resolved_instruction,
            "query_instruction": self.resolved_query_instruction,
            "min_pixels": self.resolved_min_pixels,
            "max_pixels": self.resolved_max_pixels,
            "max_length": self.max_length,
        }


class RerankerConfig(ModelOptions):
    """The second stage: a Qwen3-VL-Reranker checkpoint scoring (query, document) pairs, and how it runs."""

    model: str = Field(
        default=TINY_RERANKER,
        description="A hub id (e.g. Qwen/Qwen3-VL-Reranker-2B), a local checkpoint directory, or "
        "'tiny-reranker' for the built-in offline random one.",
    )
    instruction: str | None = Field(
        default=None,
        description="What relevance means, as '<Instruct>: ...'; default: the official 'Given a search query, "
        "retrieve relevant candidates that answer the query.'",
    )
    max_length: int = Field(
        default=10240,
        ge=16,
        description="Longest pair in tokens (the official 10240): a longer pair loses text from its end, every "
        "special and image token and the last 5 tokens kept, as the official code does.",
    )

    @property
    def resolved_instruction(self) -> str:
        return (
            self.instruction
            if self.instruction is not None and self.instruction.strip()
            else (DEFAULT_RERANK_INSTRUCTION)
        )


DEFAULT_ANSWER_SYSTEM_PROMPT = (
    "Answer the user's question from the numbered context passages and images retrieved from their "
    "collection, citing them as [1], [2], ... Say so when the context does not hold the answer."
)


class AnswerConfig(StrictModel):
    """Answers from the embedder's own model (Instruct checkpoints): `vlm-embed answer`, and Serve's
    POST /v1/chat/completions when the config has an `answer:` section."""

    top_k: int = Field(default=5, ge=1, description="Rows retrieved from the table and put into the prompt.")
    max_new_tokens: int = Field(
        default=256, ge=1, description="Most tokens of an answer (Serve: when a request names no max_tokens)."
    )
    max_new_tokens_limit: int = Field(
        default=2048, ge=1, description="Serve: the most max_tokens a request may ask for (422 above)."
    )
    temperature: float | None = Field(
        default=None, ge=0, description="0: greedy; default: the checkpoint's own generation config."
    )
    system_prompt: str = Field(
        default=DEFAULT_ANSWER_SYSTEM_PROMPT,
        min_length=1,
        description="The system message of the prompt (a request's own system message replaces it).",
    )
    max_context_chars: int = Field(
        default=4000, ge=1, description="Each retrieved text is cut to this many characters in the prompt."
    )


SourceKind = Literal["jsonl", "parquet", "csv", "images"]
KeptType = Literal["string", "int64", "float64", "bool"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class SourceConfig(StrictModel):
    """One input dataset: a text/pair table (JSONL, Parquet, CSV) or a folder tree of images.

    Relative local paths are relative to the directory the job starts in (the uploaded working directory under
    `ray job submit`). Local files are read by the Ray workers, so on a multi-node cluster they must be on
    storage every node sees; object-store URIs work everywhere.
    """

    kind: SourceKind = Field(description="jsonl, parquet, csv, or images (a folder tree, recursive)")
    path: str = Field(description="A file, a directory or a glob; local or any URI Ray Data reads.")
    name: str | None = Field(default=None, description="Label in the errors table; default: the path.")
    id_column: str | None = Field(
        default=None,
        description="Column with stable ids; default: a content hash of the row's text and image "
        "(images kind: the path relative to the folder).",
    )
    text_column: str | None = Field(
        default=None, description="Column with the text (tables); default: 'text' where the row has one."
    )
    image_column: str | None = Field(
        default=None,
        description="Column with an image path or image bytes; default: 'image' where the row has one.",
    )
    image_root: str | None = Field(
        default=None,
        description="Relative image paths are resolved against this; default: the file's folder.",
    )
    keep_columns: list[str] = Field(default_factory=list, description="Source columns copied into the table.")
    keep_types: dict[str, KeptType] = Field(
        default_factory=dict,
        description="Types of kept columns (string, int64, float64, bool); default string. Text values are "
        "parsed ('2001' -> 2001); a value that does not fit goes to the errors table.",
    )
    extensions: list[str] = Field(
        default_factory=lambda: list(IMAGE_EXTENSIONS), description="Image file extensions (images kind)."
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="Object-store options for reading this source (and the image URIs its rows name), with "
        "the keys LanceDB takes: aws_access_key_id, aws_secret_access_key, aws_endpoint, aws_region, "
        "allow_http; default: the store's usual environment variables and files.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        undeclared = sorted(set(self.keep_types) - set(self.keep_columns))
        if undeclared:
            raise ValueError(f"keep_types names columns that are not in keep_columns: {undeclared}")
        if self.kind == "images":
            given = [
                f for f in ("id_column", "text_column", "image_column", "image_root") if getattr(self, f)
            ]
            if given or self.keep_columns:
                raise ValueError(
                    f"an images source has no columns: remove {given or ['keep_columns']} "
                    "(its ids are the paths relative to the folder)"
                )
        reserved = {"id", "modality", "text", "image_uri", "vector"} & set(self.keep_columns)
        if reserved:
            raise ValueError(f"keep_columns may not name the table's own columns {sorted(reserved)}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path


WriteMode = Literal["append", "overwrite"]


class TableConfig(StrictModel):
    """Where the vectors and the errors go."""

    uri: str = Field(default="./data/lancedb", description="A LanceDB directory or object-store URI.")
    name: str = Field(default=DEFAULT_TABLE_NAME, description="The vectors table.")
    errors_name: str = Field(default="errors", description="The errors table beside it.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options (keys, region)."
    )
    mode: WriteMode = Field(
        default="append",
        description="append: resume into the existing tables (refused if they were embedded differently); "
        "overwrite: drop both tables and start again.",
    )
    retry_errors: bool = Field(
        default=False,
        description="Embed again the rows recorded in the errors table (they are skipped otherwise).",
    )
    commit_rows: int = Field(
        default=100_000,
        ge=1,
        description="About how many rows one commit holds: consecutive work units are written by the workers "
        "and committed together once they hold about this many rows (a bigger unit is committed alone). A "
        "crash loses at most the units not yet committed, which the rerun reads again.",
    )
    unit_bytes: int = Field(
        default=64 * 2**20,
        ge=1,
        description="Work unit size of a JSONL file: byte ranges of this many bytes (Parquet: one row group; "
        "CSV and compressed files: one file). A rerun skips committed units without reading them.",
    )
    unit_files: int = Field(default=1024, ge=1, description="Images per work unit of an image folder.")
    vector_index_min_rows: int = Field(
        default=100_000, ge=1, description="Build a cosine vector index once the table has this many rows."
    )
    fts_index: bool = Field(default=True, description="Build a full-text index on `text` after a run.")


class ResourcesConfig(StrictModel):
    """The Ray knobs of a backfill."""

    ray_address: str | None = Field(
        default=None,
        description="Ray cluster address ('auto': the cluster running on this machine); default: the cluster "
        "in RAY_ADDRESS (set by `ray job submit`), else a new local Ray.",
    )
    num_gpus_per_actor: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per embedding actor (fractions allowed); default: 1 if the cluster "
        "has GPUs, else 0 (the same pool runs on CPU).",
    )
    num_cpus_per_actor: float = Field(default=1, ge=0, description="CPUs per embedding actor.")
    min_actors: int = Field(
        default=1,
        ge=1,
        description="Smallest embedding actor pool of `stages.build_pipeline` without a pool (Ray Data's "
        "autoscaling pool). The backfill starts max_actors workers at once; each takes batches once its model "
        "has loaded, so a cluster that can place fewer (yet) runs with those.",
    )
    max_actors: int = Field(default=1, ge=1, description="Embedding workers (actors) of a backfill run.")
    batch_rows: int = Field(default=256, ge=1, description="Rows handed to an embedding actor at a time.")
    prepare_batch_rows: int = Field(
        default=64, ge=1, description="Rows per CPU prepare task (decode, resize, tokenize)."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) is larger than max_actors ({self.max_actors})")
        return self


class ServeConfig(StrictModel):
    """The HTTP endpoint: where it listens, what it accepts, how it batches, and its replicas.

    These fields are the one place the Serve deployments' options are set (`serve.app.deployment_options`
    derives them): `vlm-embed serve` flags override the file's values, a Serve config file carries them in its
    application's `args.config.serve`, and its `deployments:` entries are refused by `vlm-embed serve` (with
    `serve run`/`serve deploy` Serve would apply them on top: leave them out). Changing one redeploys the app.
    """

    host: str = Field(default="127.0.0.1", description="Bind address; 127.0.0.1 unless told otherwise.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    api_key_env: str = Field(
        default="VLM_EMBED_API_KEY",
        description="Environment variable holding the API key; unset: no key needed.",
    )
    served_model_name: str | None = Field(default=None, description="Model name reported by the API.")
    # what one request may carry
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024, description="Largest request body (413 above).")
    max_items_per_request: int = Field(
        default=256, ge=1, description="Most inputs in one request (413 above)."
    )
    max_text_chars: int = Field(default=32_768, ge=1, description="Longest text of one input (422 above).")
    max_top_k: int = Field(default=100, ge=1, description="Largest top_k of a /search request.")
    # batching and time
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, description="How long a server batch waits for more requests to join it."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="A request not answered by then gets 503 with Retry-After."
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (seconds) sent with every 503.")
    # replicas (defaults of the Serve deployments: EmbeddingModel, and the EmbeddingService ingress)
    min_replicas: int = Field(default=1, ge=0, description="Fewest model replicas (autoscaling).")
    max_replicas: int = Field(default=1, ge=1, description="Most model replicas (autoscaling).")
    target_ongoing_requests: float = Field(
        default=16,
        gt=0,
        description="Items waiting per model replica the autoscaler aims for (batching wants several).",
    )
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description="Calls one model replica works on at once (an ingress call carries one or more requests); "
        "each ingress replica takes this many requests per model replica.",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=-1,
        description="Requests queued per proxy before 503 with Retry-After (-1: no limit).",
    )
    num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per model replica; default: 1 if the Ray cluster has GPUs, else 0.",
    )
    num_cpus: float = Field(default=1, ge=0, description="CPUs per model replica.")
    upscale_delay_s: float = Field(
        default=10, ge=0, description="How long the autoscaler sees too much load before adding a replica."
    )
    downscale_delay_s: float = Field(
        default=120, ge=0, description="How long it sees too little before removing one."
    )
    health_check_period_s: float = Field(
        default=10, gt=0, description="How often Serve checks a model replica's health."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30, ge=0, description="How long a stopping model replica may finish its requests."
    )
    reranker_replicas: int = Field(
        default=1, ge=1, description="Reranker replicas (when the config has a reranker: section)."
    )
    reranker_num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per reranker replica; default: 1 if the Ray cluster has GPUs, else 0 (a fraction "
        "shares a GPU with the embedder).",
    )
    rerank_candidates: int = Field(
        default=50,
        ge=1,
        description="Rows a /search with rerank hands to the reranker when it names no rerank_candidates "
        "(at most max_items_per_request).",
    )
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="HTTP ingress replicas (checks, tokenizing, responses); add some on busy GPU nodes.",
    )
    ingress_num_cpus: float = Field(default=0.5, ge=0, description="CPUs per ingress replica.")
    high_throughput: bool = Field(
        default=False,
        description="Ray Serve's high-throughput mode: HAProxy in front of ingress replicas that serve HTTP "
        "themselves, gRPC between the deployments. It is set in the Ray processes' environment, so it applies "
        "where vlm-embed starts Ray; a cluster needs it where Ray starts (README, Serving). HAProxy's "
        "stats (8404) and metrics (9101) ports then listen on all interfaces.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_image_pixels" in data:
            raise ValueError(
                "serve.max_image_pixels is gone: the image-size bound is one option, embedder.max_image_pixels "
                "(and reranker.max_image_pixels), which the server applies to HTTP requests too"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas})"
            )
        return self


class Config(StrictModel):
    """The one configuration every entry point produces: the backfill job, the CLI and the Serve app."""

    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    reranker: RerankerConfig | None = Field(
        default=None,
        description="A second stage for search: when set, Serve deploys it (POST /rerank, /search with "
        "rerank: true).",
    )
    answer: AnswerConfig | None = Field(
        default=None,
        description="Answers from the embedder's own model (Instruct checkpoints): when set, Serve answers "
        "POST /v1/chat/completions from the table, with the weights the embedder uses (no second copy).",
    )
    sources: list[SourceConfig] = Field(default_factory=list)
    table: TableConfig = Field(default_factory=TableConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
