"""The run config: one flat YAML file, validated once, strictly.

This module is the single place that knows key names and defaults. Everything downstream receives a
validated ``RunConfig`` (or one of its small sub-views: ``cfg.lora``, ``cfg.quant``, ``cfg.data``) and never
re-checks a key. Key names follow Axolotl where one exists, so a user's muscle memory carries over.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_cli.data.chat_templates import check_chat_template
from qlora_cli.errors import ConfigError

DatasetType = Literal["completion", "alpaca", "chat", "sharegpt", "text", "preference", "unpaired"]
CHAT_TYPES = ("chat", "sharegpt")  # conversations rendered by the chat template
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
Method = Literal["sft", "dpo", "orpo", "kto"]
PREFERENCE_TYPES = ("preference", "unpaired")  # pairs (chosen, rejected); KTO's single labelled responses
DType = Literal["bfloat16", "float16", "float32"]
Optimizer = Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"]
Scheduler = Literal["cosine", "linear", "constant"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class DatasetSpec(BaseModel):
    """One entry of ``datasets`` / ``eval_datasets``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)  # a local .jsonl/.json/.csv/.parquet file, a dataset folder, or a hub name
    type: DatasetType = "completion"  # how a row becomes prompt and target text (preference, unpaired: see method)
    split: str = "train"  # hub datasets and folders: which split to read
    # hub datasets and folders, passed to datasets.load_dataset as they are:
    name: str | None = Field(None, min_length=1)  # the subset (configuration)
    data_files: str | list[str] | dict[str, str | list[str]] | None = None  # files inside the dataset
    revision: str | None = Field(None, min_length=1)  # a branch, tag or commit of a hub dataset
    max_samples: int | None = Field(None, ge=1)  # keep the first N rows (any source)
    # chat and sharegpt rows (docs/data.md):
    tools: list[dict[str, Any]] | str | None = None  # tool definitions for every row without its own (or a .json file)
    roles: dict[str, str | list[str]] | None = None  # a message's role (ShareGPT's from) -> system/user/assistant/tool
    # a mixture (several datasets): this one's share of an epoch, or its exact number of examples per epoch
    weight: float | None = Field(None, gt=0)
    count: int | None = Field(None, ge=1)

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: dict[str, str | list[str]] | None) -> dict[str, str | list[str]] | None:
        """Either {their name: our role} or Axolotl's {our role: [their names]}; each names one of ours."""
        for key, target in (value or {}).items():
            if isinstance(target, list):
                if key not in MESSAGE_ROLES:
                    raise ValueError(f"roles: {key!r} is not a role ({', '.join(MESSAGE_ROLES)})")
            elif target not in MESSAGE_ROLES:
                raise ValueError(f"roles: {key!r} maps to {target!r}, not a role ({', '.join(MESSAGE_ROLES)})")
        return value

    @model_validator(mode="after")
    def _mixture(self) -> DatasetSpec:
        if self.weight is not None and self.count is not None:
            raise ValueError("give a dataset a weight or a count, not both")
        if (self.tools is not None or self.roles is not None) and self.type not in CHAT_TYPES:
            raise ValueError(f"tools and roles apply to chat and sharegpt rows, not to type {self.type}")
        return self


class RunConfig(BaseModel):
    """Every key of a run. ``extra="forbid"``: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    base_model: str = Field(min_length=1)  # local folder or hub id
    tokenizer: str | None = None  # default: base_model
    trust_remote_code: bool = False  # run Python shipped with the model; off unless asked for
    allow_pickle_weights: bool = False  # also read .bin/.pt weights (pickle can run code); safetensors only by default
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None  # None: transformers picks
    chat_template: str | None = None  # None/"tokenizer": the tokenizer's own; a name (llama3, chatml, ...); or Jinja
    # quantization
    load_in_4bit: bool = True  # False: plain LoRA on a 16-bit base
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    bnb_4bit_compute_dtype: DType = "bfloat16"  # matmul dtype; also the dtype of the unquantized base parts
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"  # FSDP: the compute dtype
    # LoRA
    lora_r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_use_rslora: bool = False  # scaling = alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # DoRA: a trained magnitude per output row times the normalised W + BA (PEFT's use_dora)
    # where the adapter starts (docs/adapters.md): default (B = 0), gaussian, loftq (the 4-bit error's top r
    # directions), pissa / pissa_niter_N (the weight's top r singular directions), olora (its first r QR directions)
    init_lora_weights: str = "default"
    loftq_iter: int = Field(1, ge=1)  # LoftQ's alternating steps; above 1 they re-quantize the base (refused)
    # new tokens and trained embedding rows (PEFT's trainable tokens; docs/adapters.md): each listed token's row of
    # the embedding (and of an untied head) is trained, every other row stays frozen
    tokens: list[str] = Field(default_factory=list)  # added to the tokenizer as normal tokens (Axolotl's tokens)
    special_tokens: list[str] | dict[str, str] = Field(default_factory=list)  # added as special tokens; a dict
    # also gives roles: {pad_token: "<|pad|>", eos_token: ...} (Axolotl's special_tokens)
    trainable_token_indices: list[int] = Field(default_factory=list)  # token ids whose rows are trained too
    modules_to_save: list[str] = Field(default_factory=list)  # embed_tokens / lm_head trained whole (PEFT's)
    # training method (docs/preference.md): supervised fine-tuning, or preference tuning from preference data
    method: Method = "sft"
    beta: float = Field(0.1, gt=0, le=100)  # DPO/IPO/KTO: how far the policy may move from the reference
    dpo_loss: Literal["sigmoid", "robust", "ipo"] = "sigmoid"  # robust: noise-corrected; ipo: squared, per token
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # DPO: the assumed share of flipped labels (cDPO, robust)
    orpo_alpha: float = Field(0.1, gt=0, le=100)  # ORPO: weight of the odds-ratio term beside the NLL of chosen
    kto_desirable_weight: float = Field(1.0, gt=0, le=100)  # KTO: weight of desirable responses' losses
    kto_undesirable_weight: float = Field(1.0, gt=0, le=100)  # ... and of undesirable ones
    ref_adapter: str | None = Field(None, min_length=1)  # a run folder: its adapter is the reference and the start
    precompute_ref_log_probs: bool = False  # reference log-probs computed once before training, not every step
    # data
    datasets: list[DatasetSpec] = Field(min_length=1)
    eval_datasets: list[DatasetSpec] = Field(default_factory=list)
    val_set_size: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of training rows held out when no eval_datasets
    train_on_inputs: bool = False  # True: loss on prompts too
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # chat: which assistant turns are targets
    train_on_reasoning: bool = True  # chat: an assistant turn's reasoning (reasoning_content) is a target too
    sequence_len: int = Field(512, ge=2)  # longer examples are truncated (and counted)
    sample_packing: bool = False  # pack short examples into sequence_len rows, attention kept within each example
    allow_degenerate_data: bool = False  # train even when every example looks broken (see data.check_not_degenerate)
    dataset_cache: bool = True  # reuse tokenized examples from $QLORA_CACHE/tokenized (see data_cache)
    dataset_num_proc: int | None = Field(None, ge=1)  # processes tokenizing a large dataset; default: CPU count
    fsdp: bool = False  # shard base, adapter and optimizer over the processes (FSDP2; docs/training.md)
    streaming: bool = False  # read the training JSONL files a block at a time (data larger than memory; docs/data.md)
    stream_block_rows: int = Field(10_000, ge=1)  # rows per block: read, tokenized and shuffled together
    # batch and schedule
    micro_batch_size: int = Field(4, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)  # default: micro_batch_size
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)  # when set, overrides num_epochs
    learning_rate: float = Field(2.0e-4, gt=0)
    lr_scheduler: Scheduler = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    optimizer: Optimizer = "paged_adamw_8bit"
    gradient_checkpointing: bool | Literal["offload"] = True  # recompute activations in backward; "offload"
    # also keeps the checkpointed layer inputs in pinned CPU memory (long sequences on small GPUs)
    checkpoint_every_n_layers: int = Field(1, ge=1)  # >1: recompute only every n-th layer (more memory, faster)
    # speed (each switchable; the plain path is the reference they are tested against)
    fused_lora: bool = True  # one autograd node per LoRA layer, 4-bit weights dequantized on the fly
    fused_cross_entropy: bool = True  # head + loss on target positions only, chunked; no full float32 logits
    liger_kernels: Literal["auto", "true", "false"] = "auto"  # Liger's RMSNorm/RoPE/SwiGLU on a GPU when installed
    torch_compile: bool = False  # torch.compile each decoder layer (LoRA layers run between the compiled pieces)
    # logging, eval, output
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)  # None: eval only at the end
    seed: int = Field(42, ge=0, le=2**32 - 1)  # NumPy's seed range; set_seed seeds Python, NumPy and torch with it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    output_dir: str = "runs/my-run"
    # reliability
    save_steps: int | None = Field(None, ge=1)  # checkpoint every N steps into output_dir/checkpoints/step-N
    save_total_limit: int | None = Field(None, ge=1)  # keep only the newest K checkpoints
    resume_from_checkpoint: str | None = None  # "auto" (newest complete checkpoint) or a checkpoint folder
    max_bad_steps: int = Field(10, ge=1)  # stop after this many consecutive non-finite steps
    # stop when more than this fraction of the steps so far were non-finite (counted from the 3rd such step)
    max_bad_fraction: float = Field(0.25, ge=0, le=1)
    # early stopping (on eval_loss; needs eval data and eval_steps)
    early_stopping_patience: int | None = Field(None, ge=1)  # stop after N evals without eval_loss improving
    early_stopping_threshold: float = Field(0.0, ge=0)  # an eval improves only when it beats the best by more
    save_best: bool = False  # keep the adapter of the best eval as output_dir/best/
    # experiment trackers (accelerate's tracking API; the same numbers as metrics.jsonl)
    report_to: list[Tracker] = Field(default_factory=list)  # tensorboard, wandb, mlflow; none (the default): []
    run_name: str | None = Field(None, min_length=1)  # the run's name in the trackers; default: output_dir's name
    wandb_project: str | None = Field(None, min_length=1)  # W&B project; default: $WANDB_PROJECT, else qlora
    wandb_entity: str | None = Field(None, min_length=1)  # W&B team or user; default: $WANDB_ENTITY, else W&B's default

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _one_target_as_list(cls, v: Any) -> Any:
        # `lora_target_modules: q_proj` means the one suffix, not a regex.
        return [v] if isinstance(v, str) and v != "all-linear" else v

    @field_validator("lora_target_modules")
    @classmethod
    def _targets_not_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("must list at least one module name, or be the string all-linear")
            if any(not t.strip() for t in v):
                raise ValueError("module names must not be empty")
        return v

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _known_init(cls, v: Any) -> Any:
        # PEFT's spellings: true is its default start; false (a random B, so the adapter changes the model at
        # step 0) is a test device in PEFT and not offered
        if v is True:
            return "default"
        if v is False:
            raise ValueError("false (a random B that changes the model before training) is not offered; use default")
        if not isinstance(v, str) or not (v in INIT_KINDS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", v)):
            raise ValueError(f"expected one of {', '.join(INIT_KINDS)} or pissa_niter_N (N >= 1), got {v!r}")
        return v

    @field_validator("tokens", "special_tokens")
    @classmethod
    def _tokens_are_text(cls, v: Any) -> Any:
        values = list(v.values()) if isinstance(v, dict) else v
        if any(not t for t in values):
            raise ValueError("a token must not be empty")
        if isinstance(v, dict):
            roles = ("bos_token", "eos_token", "pad_token", "unk_token")
            unknown = [k for k in v if k not in roles]
            if unknown:
                raise ValueError(f"{unknown[0]!r} is not a token role; roles: {', '.join(roles)}")
        return v

    @field_validator("trainable_token_indices")
    @classmethod
    def _token_ids(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("token ids are >= 0")
        return list(dict.fromkeys(v))

    @property
    def added_tokens(self) -> list[str]:
        """Every token the config adds or names by text: tokens, then special_tokens (list or the dict's values)."""
        special = list(self.special_tokens.values()) if isinstance(self.special_tokens, dict) else self.special_tokens
        return list(dict.fromkeys([*self.tokens, *special]))

    def trained_tokens(self, new: list[str]) -> list[str]:
        """The tokens whose rows train: every one listed in tokens / special_tokens (list form), and a role's
        token (dict form) only when it is ``new`` to the tokenizer (a pad role on EOS leaves EOS's row alone)."""
        listed = [*self.tokens, *(self.special_tokens if isinstance(self.special_tokens, list) else [])]
        return list(dict.fromkeys([*listed, *new]))

    @property
    def trains_rows(self) -> bool:
        return bool(self.added_tokens or self.trainable_token_indices)

    @model_validator(mode="after")
    def _rows_fit(self) -> RunConfig:
        if self.trains_rows and self.method != "sft":
            key = "tokens" if self.tokens else "special_tokens" if self.special_tokens else "trainable_token_indices"
            raise ValueError(f"__key__{key}: not with method: {self.method} yet (new tokens train with method: sft)")
        if self.modules_to_save and self.method != "sft":
            raise ValueError(f"__key__modules_to_save: not with method: {self.method} yet (method: sft)")
        return self

    @model_validator(mode="after")
    def _init_fits(self) -> RunConfig:
        init = self.init_lora_weights
        if self.loftq_iter != 1:
            if init != "loftq":
                raise ValueError("__key__loftq_iter: applies to init_lora_weights: loftq")
            raise ValueError(
                "__key__loftq_iter: only 1 (more alternating steps re-quantize the base, so the run would no longer "
                "train on the published model and every later command would need that new base)"
            )
        if init in ("default", "gaussian"):
            return self
        if self.use_dora:
            raise ValueError(f"__key__init_lora_weights: {init} is not offered with use_dora yet; use default")
        if self.ref_adapter:
            raise ValueError(
                f"__key__init_lora_weights: {init} does not apply with ref_adapter (the start is its adapter)"
            )
        if init == "loftq" and not self.load_in_4bit:
            raise ValueError(
                "__key__init_lora_weights: loftq corrects the 4-bit base's quantization error; with load_in_4bit: "
                "false there is none (use pissa, olora or default)"
            )
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        return check_chat_template(v)  # a name that is not a template is never used as Jinja text

    @field_validator(
        "learning_rate",
        "lora_alpha",
        "num_epochs",
        "weight_decay",
        "val_set_size",
        "early_stopping_threshold",
        "beta",
        "label_smoothing",
        "orpo_alpha",
        "kto_desirable_weight",
        "kto_undesirable_weight",
    )
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode turns `lora_r: true` into 1; a boolean where a number belongs is a typo.
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    ann = str(field.annotation)
                    if "int" in ann or "float" in ann:
                        raise ValueError(f"__key__{key}: expected a number, got {value!r}")
        return data

    @model_validator(mode="before")
    @classmethod
    def _fsdp_optimizer(cls, data: Any) -> Any:
        # bitsandbytes' optimizers update whole tensors and cannot take FSDP's sharded ones; AdamW's state is
        # split over the processes anyway, so under fsdp the default optimizer is torch's AdamW
        if isinstance(data, dict) and data.get("fsdp") is True and "optimizer" not in data:
            data = {**data, "optimizer": "adamw_torch"}
        return data

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        # `report_to: tensorboard` is the one tracker; `none` (or null) is none, as in transformers
        if v is None or v == "none" or v == ["none"]:
            return []
        v = [v] if isinstance(v, str) else v
        return list(dict.fromkeys(v)) if isinstance(v, list) else v

    @property
    def has_eval(self) -> bool:
        """Whether the run has eval data (its own files, or a share of the training data)."""
        return bool(self.eval_datasets) or self.val_set_size > 0

    @property
    def eval_micro_batch_size(self) -> int:
        """The eval batch: ``eval_batch_size``, else the training micro-batch."""
        return self.eval_batch_size or self.micro_batch_size

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> RunConfig:
        for key in ("early_stopping_patience", "save_best"):
            if getattr(self, key) and not self.has_eval:
                raise ValueError(f"__key__{key}: needs eval data (eval_datasets or val_set_size > 0)")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("__key__early_stopping_patience: needs eval_steps (evals during training)")
        return self

    @property
    def preference(self) -> bool:
        """Whether the run tunes on preferences (DPO, IPO, ORPO, KTO) rather than supervised targets."""
        return self.method != "sft"

    def _changed(self, key: str) -> bool:
        """Whether ``key`` holds other than its default (a dumped config lists every key, set or not)."""
        return getattr(self, key) != type(self).model_fields[key].default

    @model_validator(mode="after")
    def _method_fits_the_data(self) -> RunConfig:
        method = self.method
        wanted = {"sft": None, "dpo": ("preference",), "orpo": ("preference",), "kto": PREFERENCE_TYPES}[method]
        for key in ("datasets", "eval_datasets"):
            for i, spec in enumerate(getattr(self, key)):
                if wanted is None and spec.type in PREFERENCE_TYPES:
                    raise ValueError(
                        f"__key__{key}[{i}].type: {spec.type} rows are preference data; set method: dpo, orpo or "
                        "kto (method: sft trains on completion, alpaca, chat or text rows)"
                    )
                if wanted is not None and spec.type not in wanted:
                    need = " or ".join(f"type: {t}" for t in wanted)
                    raise ValueError(f"__key__{key}[{i}].type: method {method} trains on {need} rows, got {spec.type}")
        own = {
            "dpo_loss": "dpo",
            "label_smoothing": "dpo",
            "orpo_alpha": "orpo",
            "kto_desirable_weight": "kto",
            "kto_undesirable_weight": "kto",
        }
        for key, needs in own.items():
            if self._changed(key) and method != needs:
                raise ValueError(f"__key__{key}: applies to method: {needs}, not {method}")
        if method == "sft":
            for key in ("beta", "ref_adapter", "precompute_ref_log_probs"):
                if self._changed(key):
                    raise ValueError(f"__key__{key}: applies to preference tuning (method: dpo, orpo or kto)")
            return self
        if self.use_dora and self.ref_adapter:
            raise ValueError("__key__use_dora: not with ref_adapter yet (a DoRA reference is not kept); start fresh")
        if method == "orpo":
            for key in ("beta", "ref_adapter", "precompute_ref_log_probs"):
                if self._changed(key):
                    what = "orpo_alpha weighs its odds-ratio term" if key == "beta" else "ORPO has no reference model"
                    raise ValueError(f"__key__{key}: does not apply to method: orpo ({what})")
        if self.label_smoothing and self.dpo_loss == "ipo":
            raise ValueError("__key__label_smoothing: applies to dpo_loss: sigmoid, not ipo")
        if self.sample_packing:
            raise ValueError(f"__key__sample_packing: not with method: {method} (each response is scored on its own)")
        if self.train_on_inputs and method != "orpo":
            raise ValueError(
                f"__key__train_on_inputs: method {method} scores the responses only (ORPO may add the prompts to "
                "its NLL term)"
            )
        for key in ("micro_batch_size", "eval_batch_size"):
            if method == "kto" and (getattr(self, key) or 2) < 2:
                raise ValueError(
                    f"__key__{key}: KTO needs at least 2 (its KL estimate pairs each prompt with another "
                    "row's response in the micro-batch)"
                )
        return self

    @model_validator(mode="after")
    def _compile_fits(self) -> RunConfig:
        if self.torch_compile and self.gradient_checkpointing:
            raise ValueError(
                "__key__torch_compile: not with gradient_checkpointing (a checkpointed layer must compile as one "
                "graph, and qlora's LoRA layers run between the compiled pieces); set gradient_checkpointing: false"
            )
        if self.torch_compile and self.fsdp:
            raise ValueError("__key__torch_compile: not with fsdp yet (the sharded layers are not compiled)")
        return self

    @model_validator(mode="after")
    def _fsdp_fits(self) -> RunConfig:
        if not self.fsdp:
            return self
        if self.load_in_4bit and self.bnb_4bit_quant_storage != self.bnb_4bit_compute_dtype:
            raise ValueError(
                f"__key__fsdp: needs bnb_4bit_quant_storage: {self.bnb_4bit_compute_dtype} (the compute dtype), so "
                "that the packed 4-bit weights shard as floats"
            )
        if self.method != "sft":
            raise ValueError(f"__key__fsdp: not with method: {self.method} yet (its reference runs unsharded)")
        if self.optimizer != "adamw_torch":
            raise ValueError(
                f"__key__optimizer: {self.optimizer} cannot update FSDP's sharded parameters (bitsandbytes' optimizers "
                "take whole tensors); use adamw_torch (the default with fsdp: true), whose state FSDP shards"
            )
        return self

    @model_validator(mode="after")
    def _streaming_fits(self) -> RunConfig:
        if not self.streaming:
            return self
        if self.max_steps is None:
            raise ValueError("__key__streaming: needs max_steps (a stream's length is not known before it is read)")
        if self.val_set_size:
            raise ValueError("__key__val_set_size: not with streaming; hold eval data out in eval_datasets")
        if self.method != "sft":
            raise ValueError(f"__key__streaming: not with method: {self.method} yet (method: sft)")
        for d in self.datasets:
            if not d.path.lower().endswith(".jsonl"):
                raise ValueError(f"__key__streaming: reads local .jsonl files; {d.path} is not one")
            for key in ("weight", "count", "max_samples"):
                if getattr(d, key) is not None:
                    raise ValueError(f"__key__streaming: not with a dataset's {key} yet ({d.path})")
        return self

    @model_validator(mode="after")
    def _mixture_weights(self) -> RunConfig:
        mixed = [d for d in self.datasets if d.weight is not None or d.count is not None]
        if mixed and self.val_set_size:
            raise ValueError("__key__val_set_size: not with a weighted mixture; hold eval data out in eval_datasets")
        if mixed and any(d.weight is None and d.count is None for d in self.datasets):
            raise ValueError(
                "__key__datasets: a mixture gives every dataset a weight (or a count): "
                + ", ".join(d.path for d in self.datasets if d.weight is None and d.count is None)
                + " has neither"
            )
        if any(d.weight is not None or d.count is not None for d in self.eval_datasets):
            raise ValueError("__key__eval_datasets: weight and count apply to training datasets")
        return self

    @model_validator(mode="after")
    def _wandb_keys_need_wandb(self) -> RunConfig:
        # Axolotl turns W&B on with wandb_project; in qlora report_to does, and a W&B key without it would do nothing
        for key in ("wandb_project", "wandb_entity"):
            if getattr(self, key) is not None and "wandb" not in self.report_to:
                raise ValueError(f"__key__{key}: needs report_to: [wandb] (W&B is on only when report_to names it)")
        return self

    # -- sub-views handed to the modules that need them --------------------------------------
    @property
    def lora(self) -> LoRASettings:
        return LoRASettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            use_rslora=self.lora_use_rslora,
            use_dora=self.use_dora,
            init=self.init_lora_weights,
        )

    @property
    def base(self) -> ModelSettings:
        """What loading the base model and tokenizer needs (also built from a bare adapter folder)."""
        return ModelSettings(
            base_model=self.base_model,
            tokenizer=self.tokenizer,
            trust_remote_code=self.trust_remote_code,
            allow_pickle_weights=self.allow_pickle_weights,
            attn_implementation=self.attn_implementation,
            chat_template=self.chat_template,
            quant=self.quant,
            tokens=tuple(self.tokens),
            special_tokens=tuple(self.special_tokens.items())
            if isinstance(self.special_tokens, dict)
            else tuple(self.special_tokens),
        )

    @property
    def quant(self) -> QuantSettings:
        return QuantSettings(
            load_in_4bit=self.load_in_4bit,
            quant_type=self.bnb_4bit_quant_type,
            double_quant=self.bnb_4bit_use_double_quant,
            compute_dtype=self.bnb_4bit_compute_dtype,
            quant_storage=self.bnb_4bit_quant_storage,
        )

    @property
    def data(self) -> DataSettings:
        return DataSettings(
            datasets=list(self.datasets),
            eval_datasets=list(self.eval_datasets),
            val_set_size=self.val_set_size,
            train_on_inputs=self.train_on_inputs,
            train_on=self.train_on,
            train_on_reasoning=self.train_on_reasoning,
            sequence_len=self.sequence_len,
            seed=self.seed,
            allow_degenerate=self.allow_degenerate_data,
            cache=self.dataset_cache,
            num_proc=self.dataset_num_proc or os.cpu_count() or 1,
            unpaired=self.method == "kto",
        )


@dataclass(frozen=True)
class LoRASettings:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    use_rslora: bool
    use_dora: bool = False
    init: str = "default"  # init_lora_weights

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def offset_start(self) -> bool:
        """Whether the start is carried as a frozen offset (PiSSA, OLoRA) and saved in PEFT's converted form."""
        return is_offset_start(self.init)


INIT_KINDS = ("default", "gaussian", "loftq", "pissa", "olora")


def is_offset_start(init: str) -> bool:
    """PiSSA and OLoRA start from the weight's own directions, so s·B₀A₀ is taken off the base (model.starts)."""
    return init.startswith("pissa") or init == "olora"


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _default(key: str) -> Any:
    return RunConfig.model_fields[key].default


@dataclass(frozen=True, kw_only=True)
class QuantSettings:
    """How the base is loaded; the defaults are RunConfig's (NF4, double quantization, bfloat16 compute)."""

    load_in_4bit: bool = _default("load_in_4bit")
    quant_type: str = _default("bnb_4bit_quant_type")
    double_quant: bool = _default("bnb_4bit_use_double_quant")
    compute_dtype: str = _default("bnb_4bit_compute_dtype")
    quant_storage: str = _default(
        "bnb_4bit_quant_storage"
    )  # dtype of the tensor holding packed 4-bit weights (FSDP shards float storage)


@dataclass(frozen=True)
class ModelSettings:
    base_model: str
    tokenizer: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    attn_implementation: str | None = None
    chat_template: str | None = None
    quant: QuantSettings = QuantSettings()
    tokens: tuple[str, ...] = ()  # added to the tokenizer as it loads
    special_tokens: (
        tuple[str, ...] | tuple[tuple[str, str], ...]
    ) = ()  # added as special; (role, token) pairs set roles


@dataclass(frozen=True)
class DataSettings:
    datasets: list[DatasetSpec]
    eval_datasets: list[DatasetSpec]
    val_set_size: float
    train_on_inputs: bool
    sequence_len: int
    seed: int
    train_on: str = "all_assistant"
    train_on_reasoning: bool = True
    allow_degenerate: bool = False
    cache: bool = False  # through the tokenization cache (data_cache); RunConfig turns it on
    cache_required: bool = False  # a cache that cannot be written is an error, not a warning (qlora preprocess)
    num_proc: int = 1  # processes tokenizing a large dataset
    unpaired: bool = False  # KTO: preference pairs become two labelled responses each


# ---------------------------------------------------------------------------------------------
# coming from Axolotl: its keys qlora spells differently or does without, and what to write instead

_WANDB = "report_to: [wandb] with wandb_project, wandb_entity and run_name; "
_NOTHING = "nothing to set: "
# key -> the qlora way; a dict hints by the value given (None: any other value)
AXOLOTL_KEYS: dict[str, str | dict[Any, str]] = {
    "adapter": {
        "qlora": "load_in_4bit: true (the default; qlora always trains a LoRA adapter)",
        "lora": "load_in_4bit: false (LoRA on a 16-bit base)",
        None: "load_in_4bit: true (QLoRA) or false (LoRA on a 16-bit base)",
    },
    "lora_target_linear": "lora_target_modules: all-linear",
    "peft_use_rslora": "lora_use_rslora: true",
    "peft_use_dora": "use_dora: true",
    "bf16": {
        "auto": "bnb_4bit_compute_dtype: bfloat16 (the default)",
        True: "bnb_4bit_compute_dtype: bfloat16 (the default)",
        None: "bnb_4bit_compute_dtype: float16 or float32",
    },
    "fp16": {True: "bnb_4bit_compute_dtype: float16", None: "bnb_4bit_compute_dtype: bfloat16 (the default)"},
    "load_in_8bit": "load_in_4bit: true (NF4) or false (16-bit); there is no 8-bit base",
    "test_datasets": "eval_datasets",
    "flash_attention": "attn_implementation: flash_attention_2",
    "sdp_attention": "attn_implementation: sdpa",
    "xformers_attention": "attn_implementation: sdpa",
    "warmup_ratio": "warmup_steps (a number of optimizer steps)",
    "evals_per_epoch": "eval_steps (every N optimizer steps)",
    "saves_per_epoch": "save_steps (every N optimizer steps)",
    "max_packed_sequence_len": "sequence_len (with sample_packing: true)",
    "tokenizer_config": "tokenizer (a tokenizer folder or hub id)",
    "chat_template_jinja": "chat_template: the Jinja text itself",
    "use_wandb": "report_to: [wandb]",
    "wandb_name": "run_name (the run's name in every tracker)",
    "wandb_mode": "report_to: [wandb] with WANDB_MODE=offline (or online) in the environment",
    "wandb_run_id": _WANDB + "the run id is kept in output_dir/trackers.json and a resumed run continues it",
    "wandb_watch": _WANDB + "no gradient or parameter watching (the numbers of metrics.jsonl are sent)",
    "wandb_log_model": _WANDB + "adapters are not uploaded as W&B artifacts",
    "use_tensorboard": "report_to: [tensorboard]",
    "use_mlflow": "report_to: [mlflow]",
    "mlflow_tracking_uri": "report_to: [mlflow] with MLFLOW_TRACKING_URI in the environment",
    "mlflow_experiment_name": "report_to: [mlflow] with MLFLOW_EXPERIMENT_NAME in the environment",
    "mlflow_run_name": "run_name (the run's name in every tracker)",
    "liger_rms_norm": "liger_kernels: true",
    "liger_glu_activation": "liger_kernels: true",
    "liger_rope": "liger_kernels: true",
    "gradient_checkpointing_kwargs": "gradient_checkpointing: true (always non-reentrant) or offload",
    "tokenizer_type": _NOTHING + "transformers' AutoTokenizer reads it from the tokenizer files",
    "model_type": _NOTHING + "transformers' AutoModelForCausalLM reads it from config.json",
    "pad_to_sequence_len": _NOTHING + "batches are padded to their longest example (sample_packing: true fills rows)",
    "dataset_prepared_path": _NOTHING + "tokenized data is cached under $QLORA_CACHE (qlora preprocess fills it)",
    "strict": _NOTHING + "qlora is always strict (an unknown key is an error)",
    "deepspeed": "fsdp: true under `accelerate launch --multi_gpu` (FSDP2 sharding) or plain DDP; no DeepSpeed",
    "lora_modules_to_save": "modules_to_save (whole copies), or tokens / special_tokens (only their rows train)",
    "peft": "init_lora_weights: loftq (Axolotl's peft.loftq_config; qlora's LoftQ works on the NF4 base as loaded)",
    "loftq_config": "init_lora_weights: loftq",
    "loftq_bits": "init_lora_weights: loftq (always the base's 4 bits)",
    "rl": "method (sft, dpo, orpo or kto); rl: ipo is method: dpo with dpo_loss: ipo",
    "rl_beta": "beta",
    "dpo_beta": "beta",
    "dpo_label_smoothing": "label_smoothing",
    "dpo_use_weighting": _NOTHING + "qlora's DPO does not weight pairs (WPO)",
    # TRL's DPOConfig / KTOConfig / ORPOConfig spellings
    "loss_type": "dpo_loss (sigmoid or ipo; with method: dpo)",
    "desirable_weight": "kto_desirable_weight",
    "undesirable_weight": "kto_undesirable_weight",
    "ref_model": "ref_adapter (a run folder whose adapter is the reference; default: the base without adapter)",
    "max_prompt_length": "sequence_len (a prompt is cut, from its start, before a response is)",
    "max_completion_length": "sequence_len (a prompt is cut, from its start, before a response is)",
    "max_length": "sequence_len",
}
TRL_KEYS = {
    "loss_type",
    "desirable_weight",
    "undesirable_weight",
    "ref_model",
    "max_prompt_length",
    "max_completion_length",
    "max_length",
}
# keys of one datasets/eval_datasets entry
AXOLOTL_DATASET_KEYS: dict[str, str] = {
    "field_messages": "type: chat reads the messages field (or ShareGPT's conversations)",
    "message_field_role": "type: chat reads role and content (or ShareGPT's from and value)",
    "message_field_content": "type: chat reads role and content (or ShareGPT's from and value)",
    "roles_to_train": "train_on: all_assistant | last_assistant, a message's train: false, or train_on_inputs",
    "train_on_eos": "nothing to set: EOS ends every trained turn and is trained with it",
    "message_property_mappings": "roles (for ShareGPT's from names); fields are role/content or from/value",
    "field_tools": "tools (per dataset), or a tools field in each row",
    "ds_type": _NOTHING + "the reader follows the file extension",
}
# (key, value) -> the qlora value
AXOLOTL_VALUES: dict[tuple[str, Any], str] = {
    ("optimizer", "adamw_bnb_8bit"): "adamw_8bit",
    ("optimizer", "adamw_torch_fused"): "adamw_torch",
    ("type", "chat_template"): "chat",
    ("type", "alpaca_chat"): "alpaca",
    ("type", "completion_text"): "text",
}


def axolotl_hint(key: str, value: Any = None, in_dataset: bool = False) -> str:
    """`` (Axolotl's; in qlora: ...)`` for a key qlora does not have, or ``""``."""
    hint = (AXOLOTL_DATASET_KEYS if in_dataset else AXOLOTL_KEYS).get(key)
    if isinstance(hint, dict):
        try:
            hint = hint.get(value, hint[None])
        except TypeError:  # an unhashable value (a list): the general hint
            hint = hint[None]
    whose = "TRL's" if key in TRL_KEYS else "Axolotl's"
    return f" ({whose} key; in qlora: {hint})" if hint else ""


def axolotl_value_hint(key: str, value: Any) -> str:
    try:
        hint = AXOLOTL_VALUES.get((key, value))
    except TypeError:
        return ""
    return f" (Axolotl's name; in qlora: {key}: {hint})" if hint else ""


# ---------------------------------------------------------------------------------------------
# loading


MAX_YAML_NODES = 100_000  # a config is a few hundred nodes; aliases may not make it more than this


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ConfigError(f"key '{key_node.value}' is given twice (lines {seen[key_node.value]} and {line})")
            seen[key_node.value] = line
        return super().construct_mapping(node, deep)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise ConfigError("a YAML alias refers to itself")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_nodes(child, memo, open_nodes)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"YAML aliases expand to more than {MAX_YAML_NODES:,} values; refusing (an alias bomb?)")
    open_nodes.discard(key)
    memo[key] = total
    return total


def safe_load_strict(text: str) -> Any:
    """``yaml.safe_load`` that counts what aliases expand to before building any object, and refuses duplicate
    keys. Raises ``ConfigError`` for those, ``yaml.YAMLError`` for malformed YAML."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*")
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int, option: str) -> int:
    """A size as transformers reads ``max_shard_size``: ``"2GB"`` -> 2·10⁹ (also ``2G``), ``"500MB"``,
    ``"1GiB"`` -> 2³⁰, ``1000`` or ``"1000"`` -> bytes. ``option`` names the flag in the error."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.fullmatch(text.upper())
        if not m:
            raise ConfigError(f"{option}: expected a size like 2GB, 500MB or 24GiB, got {text!r}")
        number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
        if binary and not unit:
            raise ConfigError(f"{option}: expected a size like 2GB, 500MB or 24GiB, got {text!r}")
        size = int(number * (_BINARY[unit] if binary else _SCALE[unit]))
    if size <= 0:
        raise ConfigError(f"{option} must be positive, got {text!r}")
    return size


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a folder, expected a YAML file: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = safe_load_strict(text)  # safe_load plus bounds: a !!python/object tag is refused
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"learning_rate=1e-4"`` -> ``("learning_rate", 1e-4)``; the value is read as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = safe_load_strict(raw) if raw.strip() else None
    except ConfigError as e:
        raise ConfigError(f"--set {key}: {e}") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _maybe_number(value)
    return key, value


def _maybe_number(s: str) -> Any:
    # YAML 1.1 reads "1e-4" (no dot) as a string; users mean a number.
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _normalise_numbers(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        field = RunConfig.model_fields.get(key)
        if isinstance(value, str) and field is not None and "float" in str(field.annotation):
            value = _maybe_number(value)
        out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, **fields: Any) -> RunConfig:
    """Read, override and validate a config. Raises ``ConfigError`` with one line on any problem.

    ``path`` may be None when every key comes from ``fields`` (tests, other commands).
    """
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data.update(fields)
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
    return validate_config(data, source=str(path) if path is not None else "config")


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    unknown = [k for k in data if k not in RunConfig.model_fields]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), list(RunConfig.model_fields), n=1, cutoff=0.6)
        suggestion = axolotl_hint(str(key), data[key]) or (f" (did you mean '{hint[0]}'?)" if hint else "")
        raise ConfigError(f"{source}: unknown key '{key}'{suggestion}")
    try:
        return RunConfig(**_normalise_numbers(data))
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    """One line naming the key, what was wrong and what is allowed."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if msg.startswith("__key__"):  # raised by a model-level validator that knows the key
            key, _, rest = msg[len("__key__") :].partition(": ")
            parts.append(f"key '{key}': {rest}")
            continue
        if err["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
            continue
        if err["type"] == "extra_forbidden":
            field_names = list(DatasetSpec.model_fields) if "datasets" in loc else list(RunConfig.model_fields)
            name = str(err["loc"][-1])
            hint = difflib.get_close_matches(name, field_names, n=1, cutoff=0.6)
            suggestion = axolotl_hint(name, err.get("input"), in_dataset="datasets" in loc) or (
                f" (did you mean '{hint[0]}'?)" if hint else ""
            )
            parts.append(f"unknown key '{loc}'{suggestion}")
            continue
        got = err.get("input")
        msg = msg[0].lower() + msg[1:] if msg else msg
        parts.append(f"key '{loc}': {msg}, got {got!r}{axolotl_value_hint(str(err['loc'][-1]), got)}")
    first = parts[0]
    return first if len(parts) == 1 else f"{first} (and {len(parts) - 1} more problem(s))"


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every key present, in declaration order.

    Local paths that exist (base model, tokenizer, data files) are written absolute, so a run folder works from
    any directory (``qlora merge runs/x`` run elsewhere); the paths as given stay in a comment above them."""
    data = cfg.model_dump(mode="json")
    given: list[str] = []

    def absolute(where: str, value: str | None) -> str | None:
        if not value:
            return value
        path = Path(value).expanduser()
        if path.is_absolute() or not path.exists():  # absolute already, or a hub id
            return value
        given.append(f"# {where} as given: {value}\n")
        return str(path.resolve())

    for key in ("base_model", "tokenizer", "ref_adapter"):
        data[key] = absolute(key, data.get(key))
    for key in ("datasets", "eval_datasets"):
        for i, spec in enumerate(data.get(key) or []):
            spec["path"] = absolute(f"{key}[{i}].path", spec.get("path"))
    return "".join(given) + yaml.safe_dump(data, sort_keys=False)
